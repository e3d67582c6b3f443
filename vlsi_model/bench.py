"""`vlsi bench`: latency and throughput per backend, side by side with Hugging Face `generate`.

Every backend (and the `generate` baseline) runs in its own fresh Python process so that
peak RSS is that backend's alone and nothing one backend imported or allocated (torch, a
second copy of the weights, a warm allocator) flatters another; the ONNX Runtime worker
also reports whether torch was ever imported in its process (it must not be). All workers
answer the same questions about the same synthetic camera frames (640x480 scenes from
`vlsi_model.data.scenes`, test split) with the same greedy `max_new_tokens`, after one warm-up
answer, with the same thread count. With `rounds` > 1 the workers run round-robin that many
times and every figure is over all rounds, so load from other processes on a shared machine
hits all backends alike.

Per backend: load seconds (process start to model ready: imports included, as a robot's
node pays them), median vision / prefill ms, decode tokens/s (all decode tokens over all
decode time), median and p90 end-to-end ms (image in -> answer text out,
preprocessing included; for `generate` that is build_inputs + generate + decode), peak RSS,
how many answers are token-identical to `generate`'s, and the speed-up over `generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

BASELINE = "hf_generate"
ENGINE_BACKENDS = ("torch", "onnxruntime", "tensorrt")
FRAME_SIZE = (640, 480)  # the image_source node's default camera frame
WORKER_TIMEOUT_S = 1800
_RESULT_MARK = "VLSI_BENCH_RESULT "
T = TypeVar("T")
_WORKER_T0 = time.perf_counter()  # in a worker process: its start, so load_s includes imports


@dataclass
class BenchConfig:
    """What to measure. `onnx_dir` / `engine_dir`: existing artefacts (else an export is made for the run)."""

    model_dir: str
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    questions: int = 8
    max_new_tokens: int = 32
    threads: int | None = None
    device: str = "cpu"
    onnx_dir: str | None = None
    engine_dir: str | None = None
    seed: int = 0
    rounds: int = 1  # workers run round-robin this many times (fairer on a busy machine)
    long_answers: bool = True  # every other question is a caption / "where is each object?" (>= 16 tokens)
    max_load: float | None = None  # other processes' CPU cores above which no ratio is printed (load_too_high)
    dims: str | None = None  # a random-weight model at real dimensions (`real_size.DIMS`) instead of model_dir


# The families bench questions rotate through, fixed so that a family added to the generator later
# does not change which question a bench frame gets (latencies stay comparable across versions).
BENCH_FAMILIES: tuple[str, ...] = ("attribute", "count", "exist", "spatial", "compare", "describe", "caption")


# Questions whose answers are long (a caption, every object with its region: 16.5 tokens on average
# for the shipped student on the bench's frames, up to ~40), so a benchmark measures decode and not
# only vision + prefill.
LONG_ANSWER_QUESTIONS: tuple[str, ...] = ("What objects are there?", "Where is each object?")


def bench_inputs(n: int, seed: int = 0, long_answers: bool = True) -> list[tuple[np.ndarray, str]]:
    """n (frame, question) pairs: one question per test-split scene, families in rotation; with
    `long_answers` every other question is one of LONG_ANSWER_QUESTIONS."""
    from vlsi_model.data import question_families, render, scenes
    out: list[tuple[np.ndarray, str]] = []
    i = 0
    while len(out) < n:
        s = scenes.scene_seed("test", seed, i)
        # the demo camera's scenes (config/vqa.yaml: scene_layout grid, 4x3 at 640x480), what the
        # shipped student was trained on: on random layouts its captions collapse to ~3 tokens
        scene = scenes.generate_scene(s, scenes.SceneConfig(width=FRAME_SIZE[0], height=FRAME_SIZE[1],
                                                            layout="grid", grid=(4, 3)))
        qas = question_families.make_questions(scene, s, BENCH_FAMILIES)
        if long_answers and len(out) % 2 == 1:
            out.append((render.render_scene(scene), LONG_ANSWER_QUESTIONS[(len(out) // 2) % 2]))
        elif qas:
            out.append((render.render_scene(scene), qas[i % len(qas)].question))
        i += 1
    return out


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity set: a container's cpuset, `taskset`)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def load_too_high(others: list[float], max_load: float | None, loads: list[float] | None = None) -> bool:
    """Whether the machine was too busy for a ratio to mean anything: under load torch processes
    slow down 10-40x while onnxruntime barely moves (measured), so a ratio taken then is wrong by
    that factor. `others`: cores of this process's CPU set used by other processes while each
    worker measured (`other_cpu_cores`); the bound defaults to 0.25 x those cores; 0 means always
    too busy. Where that cannot be measured (no /proc/stat), the 1-min load average (`loads`,
    which counts the bench's own threads) is held against 0.75 x the cores instead."""
    cores = len(usable_cpus())
    if max_load == 0:
        return True
    if others:
        return max(others) >= (max_load if max_load is not None else 0.25 * cores)
    return bool(loads) and max(loads) > (max_load if max_load is not None else 0.75 * cores)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the CPUs of this process's set have spent busy since boot (/proc/stat's per-CPU
    lines), or None where there is no /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted, busy = {f"cpu{i}" for i in usable_cpus()}, 0
    for line in lines:
        name, *values = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = ([int(v) for v in values] + [0] * 8)[:8]
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def others_cores(busy_s: float, own_s: float, wall_s: float) -> float:
    """Cores other processes kept busy over `wall_s`: the CPU set's busy seconds minus the bench's
    own (its workers' included). Clamped at 0: the two clocks tick at different granularities."""
    return max(0.0, busy_s - own_s) / wall_s if wall_s > 0 else 0.0


def call_counting_others(fn: Callable[[], T]) -> tuple[T, float | None]:
    """`fn()` and the CPU cores other processes kept busy while it ran (None without /proc/stat).

    Why not the load average: it counts the measured process itself (its threads keep a 2-core
    machine at ~2), so a run using every core always looks busy. What matters is what others took."""
    busy0, own0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    result = fn()
    busy1, own1, wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter() - t0
    others = None if busy0 is None or busy1 is None else others_cores(busy1 - busy0, own1 - own0, wall)
    return result, others


def run_counting_others(cmd: list[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run `cmd` to completion (`subprocess.run(cmd, capture_output=True, text=True, **kwargs)`) and
    measure the CPU cores other processes kept busy meanwhile (`call_counting_others`)."""
    return call_counting_others(lambda: subprocess.run(cmd, capture_output=True, text=True, **kwargs))


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the bench and its workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


# ----------------------------------------------------------------------------- worker side
def _run_generate(cfg: BenchConfig, inputs: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    import torch

    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.engine.torch_engine import TorchEngine
    from vlsi_model.prompting import build_inputs

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, proc = load_model_dir(cfg.model_dir, device=cfg.device)
    load_s = time.perf_counter() - _WORKER_T0
    stop = TorchEngine._stop_ids(model, tok)

    def one(image: np.ndarray, question: str) -> tuple[list[int], float]:
        t = time.perf_counter()
        batch = build_inputs(tok, proc, image, question)
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        ids = out[0, batch["input_ids"].shape[1]:].tolist()
        ids = ids[: next((i for i, t_ in enumerate(ids) if t_ in stop), len(ids))]
        tok.decode(ids, skip_special_tokens=True)
        return ids, (time.perf_counter() - t) * 1000

    one(*inputs[0])  # warm-up
    runs = []
    for image, question in inputs:
        ids, ms = one(image, question)
        runs.append({"total_ms": ms, "token_ids": ids, "question": question})
    return {"load_s": load_s, "runs": runs, "threads": torch.get_num_threads()}


def _run_engine(cfg: BenchConfig, backend: str, inputs: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    from vlsi_model.engine import load_engine

    options: dict[str, Any] = {}
    if backend in ("torch", "onnxruntime") and cfg.threads:
        options["num_threads"] = cfg.threads
    if backend == "onnxruntime" and cfg.onnx_dir:
        options["engine_dir"] = cfg.onnx_dir
    if backend == "tensorrt" and cfg.engine_dir:
        options["engine_dir"] = cfg.engine_dir
    device = "cuda" if backend == "tensorrt" and cfg.device == "cpu" else cfg.device
    engine = load_engine(cfg.model_dir, backend=backend, device=device, **options)
    load_s = time.perf_counter() - _WORKER_T0
    image, question = inputs[0]
    engine.answer(image, question, max_new_tokens=cfg.max_new_tokens)  # warm-up
    runs = []
    for image, question in inputs:
        r = engine.answer(image, question, max_new_tokens=cfg.max_new_tokens)
        runs.append({"vision_ms": r.vision_ms, "prefill_ms": r.prefill_ms, "decode_ms": r.decode_ms,
                     "total_ms": r.total_ms, "token_ids": r.token_ids, "question": question})
    threads: Any = cfg.threads
    if backend == "torch":
        import torch

        threads = torch.get_num_threads()
    engine.close()
    return {"load_s": load_s, "runs": runs, "threads": threads}


def worker_main(backend: str, cfg: BenchConfig) -> dict[str, Any]:
    """Measure one backend in this process (called in a fresh subprocess by `run_bench`)."""
    inputs = bench_inputs(cfg.questions, cfg.seed, cfg.long_answers)
    out = _run_generate(cfg, inputs) if backend == BASELINE else _run_engine(cfg, backend, inputs)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["torch_imported"] = "torch" in sys.modules
    return out


# ----------------------------------------------------------------------------- parent side
def _spawn(backend: str, cfg: BenchConfig) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vlsi_model.bench", "--worker", backend, "--config", json.dumps(asdict(cfg))]
    env = dict(os.environ)
    if cfg.threads:  # OpenMP/MKL pools sized like the backend's own threads
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    load_before = os.getloadavg()[0]
    proc, others = run_counting_others(cmd, timeout=WORKER_TIMEOUT_S, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return {**json.loads(line[len(_RESULT_MARK):]), "load_avg": [load_before, os.getloadavg()[0]],
                    "other_cpu_cores": [] if others is None else [round(others, 3)]}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited with status {proc.returncode}: " + " | ".join(tail)}


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker result from several rounds: all runs, median load time, the largest peak RSS."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    return {
        "runs": [run for r in results for run in r["runs"]],
        "load_s": float(np.median([r["load_s"] for r in results])),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "torch_imported": any(r["torch_imported"] for r in results),
        "threads": results[0].get("threads"),
        "rounds": len(results),
        "load_avg": [v for r in results for v in r.get("load_avg", [])],
        "other_cpu_cores": [v for r in results for v in r.get("other_cpu_cores", [])],
    }


def summarize(raw: dict[str, Any], baseline_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Aggregate one worker's runs into the table's columns."""
    if "error" in raw or "skipped" in raw:
        return raw
    runs = raw["runs"]
    total = np.array([r["total_ms"] for r in runs])
    s: dict[str, Any] = {
        "load_s": round(raw["load_s"], 2),
        "total_ms_mean": round(float(total.mean()), 2),
        "total_ms_p50": round(float(np.median(total)), 2),
        "total_ms_p90": round(float(np.percentile(total, 90)), 2),
        "tokens_mean": round(float(np.mean([len(r["token_ids"]) for r in runs])), 2),
        "peak_rss_mb": round(raw["peak_rss_mb"], 1),
        "torch_imported": raw["torch_imported"],
        "threads": raw.get("threads"),
    }
    if "vision_ms" in runs[0]:
        decode_tokens = sum(max(len(r["token_ids"]) - 1, 0) for r in runs)  # the first comes from prefill
        decode_s = sum(r["decode_ms"] for r in runs) / 1000
        s["vision_ms_p50"] = round(float(np.median([r["vision_ms"] for r in runs])), 2)
        s["prefill_ms_p50"] = round(float(np.median([r["prefill_ms"] for r in runs])), 2)
        s["decode_tokens_per_s"] = round(decode_tokens / decode_s, 1) if decode_s > 0 else None
    if baseline_runs is not None:
        # Medians: robust to the load bursts of a shared machine. Same questions, same order.
        base = np.array([r["total_ms"] for r in baseline_runs])
        s["speedup_vs_generate"] = round(float(np.median(base) / np.median(total)), 2)
        # The same over the long-answer questions alone (captions, every object's region), where
        # decode counts: on the short ones every backend pays the same exact image resize first.
        long = [(r["total_ms"], b["total_ms"]) for r, b in zip(runs, baseline_runs, strict=True)
                if r.get("question") in LONG_ANSWER_QUESTIONS]
        if long:
            ours, theirs = np.median([a for a, _ in long]), np.median([b for _, b in long])
            s["speedup_long_answers"] = round(float(theirs / ours), 2)
        pairs = zip(runs, baseline_runs, strict=True)
        s["same_tokens_as_generate"] = sum(a["token_ids"] == b["token_ids"] for a, b in pairs)
    s["questions"] = len(runs)
    return s


def run_bench(cfg: BenchConfig, progress: Any = None) -> dict[str, Any]:
    """Run the baseline and every requested backend, each in a fresh process; returns the report."""
    say = progress or (lambda msg: None)
    unknown = [b for b in cfg.backends if b not in ENGINE_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(ENGINE_BACKENDS)}")
    tmp_export: str | None = None
    notes: list[str] = []
    if cfg.engine_dir:  # a bare name is a set in trt_engines/ (vlsi_model.engine_dirs)
        from vlsi_model.engine_dirs import resolve_engine_dir

        cfg.engine_dir = str(resolve_engine_dir(cfg.engine_dir))
    if cfg.dims:
        from vlsi_model.real_size import real_size_model_dir

        cfg.model_dir = str(real_size_model_dir(cfg.dims, progress=say))
        notes.append(f"random weights at {cfg.dims} dimensions: speed and memory are real, answers are not")
    try:
        if "onnxruntime" in cfg.backends and not cfg.onnx_dir:
            from vlsi_model.manifest import find_export_dir

            found = find_export_dir(cfg.model_dir)
            if found is not None:
                cfg.onnx_dir = str(found)
            else:
                tmp_export = tempfile.mkdtemp(prefix="vlsi-bench-onnx-")
                cfg.onnx_dir = str(Path(tmp_export) / "onnx")
                say(f"no ONNX export next to the model: exporting into {cfg.onnx_dir} for this run")
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "vlsi_model.cli", "export", "--model", cfg.model_dir,
                                       "--out", cfg.onnx_dir], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"vlsi export failed: {proc.stderr.strip()[-500:]}")
                notes.append(f"ONNX export made for this run in {time.perf_counter() - t0:.1f} s (not timed below)")
        onnx_bytes = decoder_file_bytes(cfg.onnx_dir) if cfg.onnx_dir else 0  # before a temporary export goes
        raw: dict[str, Any] = {}
        order: list[str] = []
        for backend in [BASELINE, *cfg.backends]:
            if backend == "tensorrt":
                from vlsi_model.engine.tensorrt_engine import find_engine_dir, tensorrt_available

                if not tensorrt_available():
                    raw[backend] = {"skipped": "TensorRT is not installed here"}
                    continue
                if find_engine_dir(cfg.model_dir, cfg.engine_dir) is None:
                    raw[backend] = {"skipped": "no TensorRT engines (give --engine-dir)"}
                    continue
            order.append(backend)
        # Round-robin, so a burst of load from other processes hits every backend alike
        # instead of whichever happened to be measuring at the time.
        per_round: dict[str, list[dict[str, Any]]] = {b: [] for b in order}
        for r in range(cfg.rounds):
            for backend in order:
                say(f"round {r + 1}/{cfg.rounds}: measuring {backend} ({cfg.questions} questions, "
                    f"max {cfg.max_new_tokens} new tokens)")
                per_round[backend].append(_spawn(backend, cfg))
        for backend, results in per_round.items():
            raw[backend] = _merge_rounds(results)
    finally:
        if tmp_export is not None:
            shutil.rmtree(tmp_export, ignore_errors=True)
    base_runs = raw[BASELINE].get("runs")
    names = [BASELINE, *cfg.backends]  # the table's row order: baseline first, then as asked
    results = {name: summarize(raw[name], base_runs) for name in names}
    raw = {name: raw[name] for name in names}
    bound = decode_bounds(cfg, results, onnx_bytes)
    loads = [v for r in raw.values() for v in r.get("load_avg", [])]
    others = [v for r in raw.values() for v in r.get("other_cpu_cores", [])]
    busy = load_too_high(others, cfg.max_load, loads)
    if busy:
        used = (f"other processes used up to {max(others):.2f} of its {len(usable_cpus())} cores" if others
                else f"1-min load average up to {max(loads, default=0):.2f}")
        notes.append(f"the machine was busy ({used} while a backend measured): ratios are not printed; "
                     "rerun on a quiet machine (or with --max-load, knowingly)")
        for res in results.values():
            for key in ("speedup_vs_generate", "speedup_long_answers"):
                if key in res:
                    res[f"{key}_under_load"] = res.pop(key)
    return {
        "model": cfg.model_dir,
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
                    "load_avg_max": round(max(loads), 2) if loads else None,
                    "other_cpu_cores_max": round(max(others), 2) if others else None, "busy": busy},
        "notes": notes,
        "decode_bound": bound,
        "results": results,
        "raw": raw,
    }


def decoder_file_bytes(onnx_dir: str) -> int:
    """Bytes of an export's decoder graph and its external weights: what ONNX Runtime reads per
    decode step (the embedding table is a separate file, read one row per token)."""
    return sum(p.stat().st_size for p in Path(onnx_dir).glob("decoder.onnx*") if p.is_file())


def decode_bounds(cfg: BenchConfig, results: dict[str, dict[str, Any]], onnx_bytes: int = 0) -> dict[str, Any]:
    """The memory-bandwidth bound of decode, per backend: this machine's read bandwidth over the
    weight bytes one decode step reads, and each backend's measured decode tok/s as a share of it.

    Why: at real model size decode streams every weight once per token, so tok/s cannot beat
    bandwidth / bytes; how close a backend gets says how much is left to win (quantized weights
    shrink the bytes, batching shares them). CPU only: TensorRT runs on a GPU's memory.
    `onnx_bytes`: the ONNX Runtime decoder's file bytes (`decoder_file_bytes`)."""
    from vlsi_model.real_size import checkpoint_dtype_bytes, decode_weight_bytes, measure_read_bandwidth

    try:
        config = json.loads((Path(cfg.model_dir) / "config.json").read_text(encoding="utf-8"))
        # torch serves the checkpoint in its own dtype (load_model_dir keeps it): bf16 reads half of fp32
        torch_bytes = decode_weight_bytes(config, checkpoint_dtype_bytes(config))
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"no decode bound: {exc}"}
    bandwidth = measure_read_bandwidth(cfg.threads)
    out: dict[str, Any] = {"bandwidth_gbs": round(bandwidth, 2), "threads": cfg.threads or os.cpu_count(),
                           "bytes_per_token": {}}
    for name, res in results.items():
        if name == "tensorrt" or "decode_tokens_per_s" not in res or cfg.device != "cpu":
            continue
        per_token = onnx_bytes if name == "onnxruntime" else torch_bytes
        if not per_token:
            continue
        bound_tok_s = bandwidth * 1e9 / per_token
        out["bytes_per_token"][name] = per_token
        res["decode_bound_tok_s"] = bound_tok_s
        if res["decode_tokens_per_s"]:
            res["of_decode_bound"] = res["decode_tokens_per_s"] / bound_tok_s
    return out


COLUMNS = (
    ("backend", "backend", "{}"),
    ("vision_ms_p50", "vision ms", "{:.1f}"),
    ("prefill_ms_p50", "prefill ms", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("of_decode_bound", "of bound", "{:.0%}"),
    ("total_ms_p50", "total ms", "{:.1f}"),
    ("total_ms_p90", "p90 ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("load_s", "load s", "{:.2f}"),
    ("tokens_mean", "tokens", "{:.1f}"),
    ("same_tokens_as_generate", "same tokens", "{}"),
    ("torch_imported", "torch loaded", "{}"),
    ("speedup_vs_generate", "vs generate", "{:.2f}x"),
    ("speedup_long_answers", "long answers", "{:.2f}x"),
)


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table (one row per backend, baseline first)."""
    rows = [[title for _, title, _ in COLUMNS]]
    for name, res in report["results"].items():
        if "skipped" in res or "error" in res:
            rows.append([name, f"({res.get('skipped') or res.get('error')})"])
            continue
        row = []
        for key, _, fmt in COLUMNS:
            value = name if key == "backend" else res.get(key)
            if key == "same_tokens_as_generate" and value is not None:
                value = f"{value}/{res['questions']}"
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) == len(COLUMNS)) for i in range(len(COLUMNS))]
    lines = []
    for r in rows:
        if len(r) != len(COLUMNS):
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            cells = zip(r, widths, strict=True)
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    return "\n".join(lines)


def _main() -> int:
    parser = argparse.ArgumentParser(description="vlsi bench worker (internal)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    cfg = BenchConfig(**json.loads(args.config))
    out = worker_main(args.worker, cfg)
    print(_RESULT_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
