"""`vlsi bench`: latency / throughput per inference backend, side by side with Hugging Face `generate`.

Each backend and the `generate` baseline runs in a fresh process on the same questions about
the same synthetic 640x480 camera frames; the table gives vision / prefill ms, decode tok/s,
end-to-end ms, peak RSS, token agreement with `generate` and the speed-up over it. Without an
ONNX export next to the model (<model>/onnx) one is made in a temporary directory for the run.
Backends that cannot run here (tensorrt without TensorRT) are listed as skipped.
Exit status: 0 measured, 2 bad options, 1 a backend failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlsi_model.commands._common import positive_int


def _backends(text: str) -> list[str]:
    from vlsi_model.bench import ENGINE_BACKENDS

    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in ENGINE_BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"choose from {','.join(ENGINE_BACKENDS)}, got {text!r}")
    return list(dict.fromkeys(names))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` to the `vlsi` parser."""
    p = subparsers.add_parser("bench", help="benchmark backends against Hugging Face generate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory (default: the shipped student, or the placeholder)")
    p.add_argument("--backends", type=_backends, default=["torch", "onnxruntime", "tensorrt"],
                   help="comma-separated (default torch,onnxruntime,tensorrt)")
    p.add_argument("--questions", type=positive_int, default=8, help="questions (one frame each), default 8")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for every backend (default: each library's own default)")
    p.add_argument("--device", default="cpu", help="torch / onnxruntime device (tensorrt always uses cuda)")
    p.add_argument("--onnx", type=Path, default=None, help="ONNX export to use (default: <model>/onnx or a fresh one)")
    p.add_argument("--engine-dir", default=None,
                   help="TensorRT engine directory, or the name of a set in trt_engines/")
    p.add_argument("--seed", type=int, default=0, help="scene seed of the questions")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="run the backends round-robin this many times (steadier figures on a busy machine)")
    p.add_argument("--short-answers", action="store_true",
                   help="only the question families' (mostly one-word) answers; default: every other question asks "
                        "for a caption or every object's place (16-50 tokens), so decode counts")
    p.add_argument("--max-load", type=float, default=None,
                   help="print no speed-up ratio when other processes used this many CPU cores while a backend "
                        "measured (default 0.25 x cores; 0: never print one): under load torch slows down "
                        "10-40x, onnxruntime does not")
    p.add_argument("--dims", default=None, metavar="SIZE",
                   help="instead of --model: a random-weight model at real dimensions, built locally once "
                        "(tiny, 2b, 7b: Qwen2-VL; qwen3-2b, qwen3-4b; cached in $VLSI_REAL_SIZE_CACHE or "
                        "~/.cache/vlsi_ros/real_size): real speed and memory, meaningless answers")
    p.add_argument("--json", type=Path, default=None, help="also write the full report (per-question runs) here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlsi_model.bench import BenchConfig, format_table, run_bench
    from vlsi_model.defaults import default_model_is_placeholder, default_model_path

    if args.dims is not None and args.model is not None:
        print("error: give --model or --dims, not both", file=sys.stderr)
        return 2
    if args.dims is not None:
        from vlsi_model.real_size import check_fits, resolve

        try:
            args.dims = resolve(args.dims)
            check_fits(args.dims)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    model = args.model if args.model is not None else default_model_path()
    cfg = BenchConfig(model_dir=str(model), backends=args.backends, questions=args.questions, dims=args.dims,
                      max_new_tokens=args.max_new_tokens, threads=args.threads, device=args.device,
                      onnx_dir=str(args.onnx) if args.onnx else None,
                      engine_dir=args.engine_dir or None, seed=args.seed,
                      rounds=args.rounds, long_answers=not args.short_answers, max_load=args.max_load)
    try:
        report = run_bench(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    if args.model is None and args.dims is None and default_model_is_placeholder():
        print("note: the default model is the untrained PLACEHOLDER (timings are real, answers are not)",
              file=sys.stderr)
    print(f"model: {cfg.model_dir}  questions: {cfg.questions}  max_new_tokens: {cfg.max_new_tokens}  "
          f"threads: {cfg.threads or 'default'}  rounds: {cfg.rounds}  "
          f"load avg: {report['machine']['load_avg_1min']} (max during the run {report['machine']['load_avg_max']}; "
          f"other processes' CPU while measuring: up to {report['machine']['other_cpu_cores_max']} cores)")
    print(format_table(report))
    bound = report.get("decode_bound") or {}
    if bound.get("bandwidth_gbs"):
        per_token = ", ".join(f"{name} {b / 1e6:.1f} MB" for name, b in bound["bytes_per_token"].items())
        print(f"decode bound: memory read bandwidth {bound['bandwidth_gbs']:.1f} GB/s ({bound['threads']} threads); "
              f"weight bytes per decode token: {per_token}; 'of bound' = decode tok/s / (bandwidth / bytes)")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, res in report["results"].items() if "error" in res]
    return 1 if failed else 0
