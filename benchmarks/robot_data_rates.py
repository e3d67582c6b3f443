"""From-bag and labelling rates on a recorded camera stream, side by side with evaluation.

    scripts/in_env.sh python benchmarks/robot_data_rates.py [--frames 2000] [--size 640x480]
        [--questions 2000] [--batch-size 32] [--threads 2] [--json out.json]

1. Writes an MCAP bag of `--frames` synthetic 640x480 rgb8 frames at 10 Hz (a scene every 2 s,
   so near-duplicates exist), then runs `bag_to_dataset` over it twice: every frame kept (the
   read + decode + PNG-write rate), and `--every 0.5 --dedupe 0.02` (the rate a user sees when
   sampling). Reports frames read per second.
2. Labels `--questions` of those records with the shipped student as the teacher
   (`LocalTeacher`, batched greedy decoding) and answers the same questions one at a time with
   the serving engine, as `vlsi eval` does; reports questions/s of both and their ratio
   (the issue's bar: labelling must not be slower than evaluating).

Measured interleaved in one process on one machine; the load average is printed beside the
figures (a ratio measured with load above ~1.5 on this 2-core machine is not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlsi_model.data.bags import write_image_bag  # noqa: E402
from vlsi_model.data.from_bag import FromBagOptions, bag_to_dataset  # noqa: E402
from vlsi_model.data.labelling import LocalTeacher, label_file  # noqa: E402
from vlsi_model.data.render import render_scene  # noqa: E402
from vlsi_model.data.scenes import SceneConfig, generate_scene  # noqa: E402
from vlsi_model.defaults import default_model_path  # noqa: E402


def recorded_frames(n: int, width: int, height: int):
    config = SceneConfig(width=width, height=height, layout="grid", grid=(4, 3))
    scenes = {}
    for i in range(n):
        k = i // 20  # a new scene every 2 s at 10 Hz
        if k not in scenes:
            scenes = {k: render_scene(generate_scene(k, config))}
        yield 1_700_000_000_000_000_000 + i * 100_000_000, scenes[k]


def answer_one_at_a_time(data: Path, n: int) -> float:
    """Seconds to answer the first n records with the serving engine, as `vlsi eval` does."""
    from vlsi_model.data.llava import load_image, read_records
    from vlsi_model.engine import load_engine

    engine = load_engine(default_model_path(), backend="torch")
    engine.warmup()
    records = read_records(data)[:n]
    t0 = time.perf_counter()
    cache: dict[str, object] = {}
    for r in records:
        if r["image"] not in cache:
            cache = {r["image"]: load_image(data.parent / r["image"])}
        engine.answer(cache[r["image"]], r["conversations"][0]["value"].split("\n", 1)[1], max_new_tokens=64)
    seconds = time.perf_counter() - t0
    engine.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    rows: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        bag = write_image_bag(root / "run", recorded_frames(args.frames, width, height))
        rows["bag_write_s"] = time.perf_counter() - t0
        rows["bag_mb"] = sum(p.stat().st_size for p in bag.iterdir()) / 1e6
        every = bag_to_dataset(bag, root / "all", FromBagOptions(families=("count", "caption")), progress=False)
        sampled = bag_to_dataset(bag, root / "sampled", FromBagOptions(every_s=0.5, dedupe=0.02,
                                                                       families=("count", "caption")), progress=False)
        rows["from_bag_every_frame"] = {"frames": every.frames_read, "kept": every.frames_kept,
                                        "seconds": every.seconds, "frames_per_s": every.frames_per_s,
                                        "load": os.getloadavg()[0]}
        rows["from_bag_sampled"] = {"frames": sampled.frames_read, "kept": sampled.frames_kept,
                                    "near_duplicates": sampled.near_duplicates, "seconds": sampled.seconds,
                                    "frames_per_s": sampled.frames_per_s, "load": os.getloadavg()[0]}
        data = root / "all" / "data.json"
        teacher = LocalTeacher(default_model_path())
        labelled = label_file(teacher, data, root / "labelled.json", batch_size=args.batch_size, progress=False,
                              max_records=args.questions)
        rows["label_batched"] = {"questions": labelled.labelled, "seconds": labelled.seconds,
                                 "questions_per_s": labelled.rate, "batch_size": args.batch_size,
                                 "load": os.getloadavg()[0]}
        seconds = answer_one_at_a_time(data, labelled.labelled)
        rows["answer_one_at_a_time"] = {"questions": labelled.labelled, "seconds": seconds,
                                        "questions_per_s": labelled.labelled / seconds, "load": os.getloadavg()[0]}
    rows["label_vs_eval_ratio"] = rows["label_batched"]["questions_per_s"] / rows["answer_one_at_a_time"][
        "questions_per_s"]
    for name, row in rows.items():
        print(f"{name}: {json.dumps(row, default=lambda v: round(v, 2)) if isinstance(row, dict) else round(row, 2)}")
    print(f"threads {args.threads}, {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
