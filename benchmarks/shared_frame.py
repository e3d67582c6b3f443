"""Several questions about one frame: answered one by one vs together (`answer_many`).

    scripts/in_env.sh python benchmarks/shared_frame.py [--dims nano|2b] [--frames 8] [--questions 5]
        [--max-new-tokens 4] [--threads 2] [--backend torch|onnxruntime|tensorrt --onnx DIR] [--json out.json]

A robot asks standing questions about every frame ("Is the door open?", "How many people?",
alerts); each one alone re-encodes the image and re-prefills the prompt. `answer_many` runs the
vision tower once and prefills the common prefix (template + image tokens) once, then only each
question's own tokens. This measures time per frame both ways, interleaved frame by frame (so
load from other processes hits both alike), and checks the answers are token-identical.

--dims nano: the shipped student (448 x 448 frames are resized to its 112 x 84 input).
--dims 2b: a random-weight model with Qwen2-VL-2B's real dimensions (2.21 B parameters, built
locally: no download) with images up to 448 x 448 (256 image tokens); about 9 GB of RAM in fp32.
--backend onnxruntime: the ONNX Runtime engine on EXPORT_DIR (`vlsi export` of the same model;
for --dims 2b, of `vlsi_model.real_size.real_size_model_dir("2b")`), whose `answer_many` keeps the
shared prefix's KV inside ONNX Runtime.
--backend tensorrt --onnx ENGINE_DIR: the TensorRT engines `vlsi build-engine` built from that
export (a Jetson / CUDA host only), whose `answer_many` reads the prefix from its own KV set on the
GPU through the decoder's extend profile (--dims and --threads do not apply: the engines fix both).
Prints the 1-min load average beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ("How many objects are there?", "Is there a red circle?", "What color is the square?",
             "Is the blue circle left of the green square?", "How many red objects are there?",
             "What objects are there?", "Where is each object?", "Is there a yellow triangle?")


def build_engine(dims: str, threads: int, backend: str = "torch", onnx_dir: Path | None = None):
    if backend in ("onnxruntime", "tensorrt") and onnx_dir is None:
        raise SystemExit(f"--backend {backend} needs --onnx DIR (the export, or the engine directory)")
    if backend == "onnxruntime":
        from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(onnx_dir, num_threads=threads)
    if backend == "tensorrt":
        from vlsi_model.engine.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(onnx_dir)
    import torch

    from vlsi_model.defaults import default_model_path
    from vlsi_model.engine.torch_engine import TorchEngine

    torch.set_num_threads(threads)
    if dims == "nano":
        return TorchEngine.from_dir(default_model_path(), num_threads=threads)
    from vlsi_model.real_size import build_real_size_model

    model, tokenizer, processor = build_real_size_model("qwen2_vl_2b", max_pixels=448 * 448)
    return TorchEngine(model, tokenizer, processor, model_name="random-2b", num_threads=threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=("nano", "2b"), default="nano")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    parser.add_argument("--onnx", type=Path, default=None,
                        help="export directory (--backend onnxruntime) or engine directory (--backend tensorrt)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import SceneConfig, generate_scene, scene_seed
    engine = build_engine(args.dims, args.threads, args.backend, args.onnx)
    questions = list(QUESTIONS[: args.questions])
    config = SceneConfig(width=448, height=448, layout="grid", grid=(4, 4))
    frames = [render_scene(generate_scene(scene_seed("test", 3, i), config)) for i in range(args.frames + 1)]
    engine.answer(frames[-1], questions[0], max_new_tokens=2)  # warm-up (traces the decode step)
    if args.backend == "tensorrt":  # also the extend context's first run (TensorRTEngine.warmup)
        engine.warmup()
    one_by_one, together, same = [], [], 0
    loads = []
    for i, frame in enumerate(frames[:-1]):
        order = ("separate", "shared") if i % 2 == 0 else ("shared", "separate")  # interleaved
        for how in order:
            t0 = time.perf_counter()
            if how == "separate":
                answers = [engine.answer(frame, q, max_new_tokens=args.max_new_tokens) for q in questions]
                one_by_one.append(time.perf_counter() - t0)
                separate_tokens = [a.token_ids for a in answers]
            else:
                answers = engine.answer_many(frame, questions, args.max_new_tokens)
                together.append(time.perf_counter() - t0)
                shared_tokens = [a.token_ids for a in answers]
        same += sum(a == b for a, b in zip(separate_tokens, shared_tokens, strict=True))
        loads.append(os.getloadavg()[0])
    row = {"dims": args.dims, "backend": args.backend, "frames": args.frames, "questions_per_frame": len(questions),
           "max_new_tokens": args.max_new_tokens, "threads": args.threads,
           "separate_s_per_frame_p50": statistics.median(one_by_one),
           "shared_s_per_frame_p50": statistics.median(together),
           "speedup": statistics.median(one_by_one) / statistics.median(together),
           "identical_answers": f"{same}/{len(questions) * args.frames}", "load_avg_max": max(loads)}
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
