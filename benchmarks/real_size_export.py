"""`vlsi export` of a model with a real checkpoint's dimensions (random weights, built locally):
does the export path hold at 2B size (external data beyond protobuf's 2 GB, parity, TensorRT
operator check), how long does it take and how much host memory does it need?

    scripts/in_env.sh python benchmarks/real_size_export.py [--model qwen3_vl_2b] [--dtype fp16]
        [--max-image-size 448x448] [--out /tmp/real_size] [--json out.json]

Builds the model (`vlsi_model/real_size.py`; about 9.5 GB of RAM in fp32 for a 2B model), saves it
in fp16 with `save_model_dir`, frees it, then exports it in this process and prints the seconds,
the files' sizes, the parity figures and the peak RSS. A tool for sizing, not a test: the tests
export tiny models of every architecture.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(argv: list[str] | None = None) -> int:
    from vlsi_model.export.onnx_export import ExportOptions, export_model, parse_hw
    from vlsi_model.real_size import DIMS, build_real_size_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[real for real, _ in DIMS.values()], default="qwen3_vl_2b")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--max-image-size", type=parse_hw, default=(448, 448), metavar="HxW")
    p.add_argument("--out", type=Path, default=Path("/tmp/real_size"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from vlsi_model.models import save_model_dir

    t0 = time.perf_counter()
    h, w = args.max_image_size
    model, tokenizer, processor = build_real_size_model(args.model, max_pixels=h * w)
    params = sum(q.numel() for q in model.parameters())
    model = model.to(torch.float16 if args.dtype == "fp16" else torch.float32)
    model_dir = save_model_dir(model, tokenizer, processor, args.out / args.model, overwrite=True,
                               metadata={"placeholder": True, "note": f"random weights at {args.model} dimensions"})
    del model
    gc.collect()
    built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = args.out / f"{args.model}_onnx"
    manifest = export_model(model_dir, out, ExportOptions(dtype=args.dtype, max_image_size=args.max_image_size),
                            overwrite=True, progress=lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}"))
    report = {
        "model": args.model, "parameters": params, "dtype": args.dtype, "max_image_size": list(args.max_image_size),
        "build_and_save_s": round(built_s, 1), "export_s": round(time.perf_counter() - t0, 1),
        "files_gb": {f.name: round(f.stat().st_size / 2**30, 3) for f in sorted(out.iterdir())
                     if f.suffix in (".onnx", ".data", ".npy")},
        "parity": manifest["parity"], "tensorrt10_ops": {k: v["tensorrt10_ops"] for k, v in manifest["checks"].items()},
        "peak_rss_gb": _peak_rss_gb(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
