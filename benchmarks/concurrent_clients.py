"""Concurrent clients asking about different cameras: the worker answering one at a time vs decoding
the waiting answers together (`AnswerWorker(max_batch=...)` + `TorchEngine.answer_batch`).

    scripts/in_env.sh python benchmarks/concurrent_clients.py [--dims nano|2b] [--clients 1,4,8]
        [--requests 6] [--max-new-tokens 32] [--max-batch 8] [--threads 1] [--json out.json]

Each client is a thread with its own camera (its own frames, from the bench's grid scenes) that
asks a question, waits for the answer and asks the next (closed loop), `--requests` times; every
client count runs both ways, one-at-a-time first then batched, on one engine and one worker
setup, so the two see the same machine. Reported per cell: answers/s (all answers / wall time),
p50 / p95 latency (submit to answer), tokens per answer, and the other processes' CPU while it ran
(a busy machine makes the figures meaningless: ratios are printed only when others took < 0.25 of
one core per core, as `vlsi bench`). The batched answers are compared token for token with the
one-at-a-time ones.

--dims nano: the shipped student. --dims 2b: random weights with Qwen2-VL-2B's dimensions (built
locally, ~9 GB in fp32; 448 x 448 frames, 256 image tokens): answers meaningless, speed real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared_frame import build_engine  # noqa: E402  (benchmarks/ is not a package)


def run_cell(engine, frames, clients: int, requests: int, max_new_tokens: int, max_batch: int) -> dict:
    """`clients` closed-loop clients through one AnswerWorker; latencies and answers per request."""
    from vlsi_model.serving import AnswerJob, AnswerWorker

    worker = AnswerWorker(engine, capacity=max(64, clients), max_batch=max_batch)
    latencies: list[float] = []
    answers: dict[tuple[int, int], list[int]] = {}
    tokens: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            image, question = frames[(c * requests + r) % len(frames)]
            t0 = time.perf_counter()
            job = AnswerJob(question, lambda image=image: (image, None), max_new_tokens, frame_key=("camera", c, r))
            result = worker.submit(job).result(timeout=3600).result
            with lock:
                latencies.append(time.perf_counter() - t0)
                answers[(c, r)] = result.token_ids
                tokens.append(len(result.token_ids))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    worker.stop()
    latencies.sort()
    return {"answers_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens_per_answer": sum(tokens) / len(tokens), "answers": answers}


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=("nano", "2b"), default="nano")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=6, help="questions per client")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from vlsi_model.bench import bench_inputs, call_counting_others, load_too_high

    engine = build_engine(args.dims, args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    frames = bench_inputs(max(clients) * args.requests)
    engine.answer(*frames[0], max_new_tokens=2)  # warm-up: traces the decode step
    engine.answer_batch([f[0] for f in frames[:2]], [f[1] for f in frames[:2]], 2)  # and the batched one
    rows = []
    for n in clients:
        cells = {}
        for mode, max_batch in (("one at a time", 1), ("batched", args.max_batch)):
            cell, others = call_counting_others(lambda n=n, max_batch=max_batch: run_cell(
                engine, frames, n, args.requests, args.max_new_tokens, max_batch))
            cells[mode] = {**cell, "others_cores": others}
        one, batched = cells["one at a time"], cells["batched"]
        same = sum(one["answers"][k] == batched["answers"][k] for k in one["answers"])
        busy = load_too_high([c["others_cores"] for c in cells.values() if c["others_cores"] is not None], None)
        rows.append({"clients": n, **{f"{m} {k}": v for m, c in cells.items() for k, v in c.items() if k != "answers"},
                     "throughput_ratio": None if busy else batched["answers_per_s"] / one["answers_per_s"],
                     "identical_answers": f"{same}/{len(one['answers'])}"})
    print(f"dims {args.dims}, {args.threads} thread(s), {args.requests} questions per client, "
          f"max {args.max_new_tokens} new tokens, max_batch {args.max_batch}")
    print("clients  mode            answers/s   p50 s   p95 s  tokens/answer  others CPU")
    for row in rows:
        for mode in ("one at a time", "batched"):
            print(f"{row['clients']:>7}  {mode:<14} {row[f'{mode} answers_per_s']:>10.2f} {row[f'{mode} p50_s']:>7.3f} "
                  f"{row[f'{mode} p95_s']:>7.3f} {row[f'{mode} tokens_per_answer']:>14.1f} "
                  f"{_cores(row[f'{mode} others_cores']):>11}")
        ratio = row["throughput_ratio"]
        print(f"         batched / one at a time: {f'{ratio:.2f}x' if ratio else 'not printed (busy machine)'}"
              f" answers/s, identical answers {row['identical_answers']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
