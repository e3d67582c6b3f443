"""Cost of the VLsI interaction step: time per sample and peak memory, against plain SFT and the online floor.

    nice -n 10 .venv/bin/python benchmarks/distill_step_cost.py [--vocab 8192] [--finetune both] [--json out.json]

Rows, each one full optimizer step (forward + backward + gradient clipping + AdamW step), all
built in ONE process and timed interleaved (every repetition runs every row once, in a
freshly shuffled order), so a load change on the shared machine hits all rows alike:

1. `sft`          plain SFT step of the student (`SFTObjective`, every weight trains, as in step 3).
2. `floor`        the unavoidable cost of online distillation: the teacher's backbone forward
                  under no_grad (decoder output, *no* LM head: every vocabulary projection
                  belongs to the method's overhead) + the plain SFT step of row 1.
3. `online_<ft>`  `InteractionObjective` with the online teacher: hooks, verbalizers, the
                  divergence matrix for the full matching, the matched-pair and last-layer KLs
                  (default `LossConfig`, `chunk_tokens` from the command line; below
                  `--materialize-mib` the whole-batch path, `--materialize-mib 0` forces the
                  chunked, recomputing path a real 152k vocabulary takes); `<ft>` is `lora`
                  (LoRA on the decoder's linears, as `vlsi distill` does by default) or `full`
                  (decoder layers train in full, `lora.enabled: false`).
4. `cached_<ft>`  the same objective reading the teacher from a top-k `TeacherCache` (built
                  once before timing; its build time is reported separately).

Goals (issue): online / floor <= 1.25 and cached / sft <= 1.3 (ratios of the medians; the
median of the per-repetition ratios is reported beside them, as it cancels slow drifts in load).

Memory: each row runs again in its own subprocess (so one row's allocator state or teacher
weights never inflate another's): after warm-up steps (optimizer state exists), the peak RSS
high-water mark is reset (/proc/self/clear_refs) and a few steps are run. Reported: the
process's peak RSS (weights + optimizer state + the step), the step's rise above the RSS
before it (heap trimmed first, so that is live memory), and the peak of live tensor bytes
allocated during one step as torch's profiler counts them (not blurred by the allocator;
same method as test_distill_components.py).

Shapes: the defaults are the nano study's student (text 128 x 4 layers, vision 2 x 64) and
teacher (text 256 x 8, vision 4 x 128) from shared/NANO_NOTES.md, at 112 x 112 images, a
BPE tokenizer of min(--vocab, 512) tokens and LM heads of `--vocab` rows (teacher: `--vocab +
--teacher-vocab-extra`, as Qwen2-VL-7B/72B pad 128 rows more than 2B). Real Qwen vocabularies are ~152k rows, where the
vocabulary projections dominate: run `--vocab 8192` to see that regime on this CPU. Data:
scenes from `vlsi_model.data.scene_dataset.write_dataset` (every question family, captions included),
`ConversationDataset` + `make_collate_fn` exactly as the pipeline loads them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from torch_memory import tensor_peak_bytes  # noqa: E402  (benchmarks/torch_memory.py, beside this script)

from vlsi_model.distill.adapters import get_adapter  # noqa: E402
from vlsi_model.distill.config import LoraSection  # noqa: E402
from vlsi_model.distill.interaction import InteractionObjective  # noqa: E402
from vlsi_model.distill.losses import LossConfig  # noqa: E402
from vlsi_model.distill.matching import LayerMatcher, MatchConfig  # noqa: E402
from vlsi_model.distill.steps_common import prepare_trainable  # noqa: E402
from vlsi_model.distill.teacher_cache import (  # noqa: E402
    SAMPLE_INDEX_KEY,
    IndexedDataset,
    TeacherCache,
    build_teacher_cache,
    indexed_collate,
)
from vlsi_model.distill.verbalizer import Verbalizers, select_target_layers  # noqa: E402
from vlsi_model.training.sft import SFTObjective  # noqa: E402

GOAL_ONLINE_OVER_FLOOR = 1.25
GOAL_CACHED_OVER_SFT = 1.3
MEMORY_MARK = "MEMORY_JSON "
FINETUNE_MODES = ("lora", "full")


def row_names(finetune: str) -> list[str]:
    """The rows a run measures: sft, floor, then online/cached per fine-tuning mode."""
    modes = FINETUNE_MODES if finetune == "both" else (finetune,)
    return ["sft", "floor"] + [f"{kind}_{mode}" for mode in modes for kind in ("online", "cached")]


ROW_DESCRIPTIONS = {
    "sft": "plain SFT step of the student",
    "floor": "teacher backbone forward (no_grad) + plain SFT step",
    "online_lora": "interaction step, online teacher, LoRA",
    "cached_lora": "interaction step, teacher cache, LoRA",
    "online_full": "interaction step, online teacher, full FT of the decoder",
    "cached_full": "interaction step, teacher cache, full FT of the decoder",
}


# ---------------------------------------------------------------------------------------------
# Set-up: data, models, verbalizers, cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything the rows are built from; identical in the parent and in every memory subprocess."""

    args: argparse.Namespace
    tokenizer: Any
    batches: list[dict[str, Any]]  # collated, with sample_index
    student: nn.Module
    s_verbs: Verbalizers
    teacher: nn.Module | None
    t_verbs: Verbalizers | None
    cache_dir: Path | None


def make_data(args: argparse.Namespace, data_dir: Path) -> Path:
    """Render the scenes once (enough records for every batch); returns the train JSON path."""
    from vlsi_model.data.scene_dataset import write_dataset
    json_path = data_dir / "train.json"
    if not json_path.is_file():
        images = max(1, (args.batch_size * args.num_batches) // 7 + 2)  # 7 question families per image
        write_dataset(data_dir, images, seed=args.seed)
    return json_path


def make_tokenizer(args: argparse.Namespace) -> Any:
    from vlsi_model.data.question_families import corpus_texts
    from vlsi_model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_texts(300, seed=0), vocab_size=min(args.vocab, 512))


def make_batches(args: argparse.Namespace, tokenizer: Any, json_path: Path) -> list[dict[str, Any]]:
    """`num_batches` batches of `batch_size` records drawn (seeded) from every question family."""
    from vlsi_model.models import make_image_processor
    from vlsi_model.training.dataset import ConversationDataset, make_collate_fn

    processor = make_image_processor(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    dataset = IndexedDataset(ConversationDataset(json_path, tokenizer, processor, max_length=512))
    order = list(range(len(dataset)))
    random.Random(args.seed).shuffle(order)
    need = args.batch_size * args.num_batches
    if len(order) < need:
        raise SystemExit(f"only {len(order)} records for {need} samples")
    collate = indexed_collate(make_collate_fn(int(tokenizer.pad_token_id)))
    return [
        collate([dataset[i] for i in order[b * args.batch_size : (b + 1) * args.batch_size]])
        for b in range(args.num_batches)
    ]


def model_config(args: argparse.Namespace, tokenizer: Any, who: str) -> Any:
    from vlsi_model.models import tiny_qwen2vl_config

    g = lambda name: getattr(args, f"{who}_{name}")  # noqa: E731
    vocab = args.vocab + (args.teacher_vocab_extra if who == "teacher" else 0)
    return tiny_qwen2vl_config(
        tokenizer=tokenizer, vocab_size=vocab, hidden_size=g("hidden"), num_layers=g("layers"),
        num_heads=g("heads"), num_kv_heads=g("kv_heads"), intermediate_size=g("intermediate"),
        vision_depth=g("vision_depth"), vision_embed_dim=g("vision_width"), vision_heads=4,
    )


def make_verbalizers(model: nn.Module, stride: int, start: int, seed: int) -> Verbalizers:
    """Randomly initialised verb-FFNs (their values do not change the cost)."""
    adapter = get_adapter(model)
    targets = select_target_layers(adapter.num_layers(model), stride, start)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        verbs = Verbalizers(adapter.hidden_size(model), targets, residual=True)
        for ffn in verbs.ffns.values():  # a non-zero correction, like trained verbalizers
            nn.init.normal_(ffn.down_proj.weight, std=0.02)
    return verbs


def build_context(
    args: argparse.Namespace, data_dir: Path, cache_dir: Path | None, need_teacher: bool
) -> Context:
    from vlsi_model.models import build_model

    tokenizer = make_tokenizer(args)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    batches = make_batches(args, tokenizer, make_data(args, data_dir))
    student = build_model(model_config(args, tokenizer, "student"), seed=args.seed + 1)
    s_verbs = make_verbalizers(student, args.student_stride, args.student_start, args.seed + 3)
    teacher = t_verbs = None
    if need_teacher:
        teacher = build_model(model_config(args, tokenizer, "teacher"), seed=args.seed + 2)
        t_verbs = make_verbalizers(teacher, args.teacher_stride, args.teacher_start, args.seed + 4)
    return Context(args, tokenizer, batches, student, s_verbs, teacher, t_verbs, cache_dir)


def build_cache(ctx: Context, out_dir: Path) -> float:
    """Build the teacher cache over every batch; returns the build time in seconds."""
    assert ctx.teacher is not None and ctx.t_verbs is not None
    t0 = time.perf_counter()
    build_teacher_cache(
        ctx.teacher, ctx.t_verbs, ctx.batches, out_dir, k=ctx.args.k,
        vocab_size=min(ctx.args.vocab, ctx.args.vocab + ctx.args.teacher_vocab_extra),
        chunk_tokens=ctx.args.chunk_tokens,
    )
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


class FloorObjective(nn.Module):
    """Teacher backbone forward under no_grad (its output is discarded) + the plain SFT objective."""

    def __init__(self, teacher: nn.Module, sft: SFTObjective) -> None:
        super().__init__()
        self.teacher = teacher
        self.sft = sft
        self.adapter = get_adapter(teacher)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            self.adapter.backbone_forward(self.teacher, self.adapter.model_inputs(batch))
        return self.sft(batch)


@dataclass
class Row:
    name: str
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    keep_sample_index: bool

    def step(self, batch: Mapping[str, Any], step: int, max_steps: int) -> float:
        """One optimizer step as the trainer does it (progress hook, forward, backward, clip, AdamW)."""
        if not self.keep_sample_index:  # SFTObjective feeds the whole batch to the model
            batch = {k: v for k, v in batch.items() if k != SAMPLE_INDEX_KEY}
        set_progress = getattr(self.objective, "set_progress", None)
        if callable(set_progress):
            set_progress(step, max_steps)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.objective(batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return float(out["loss"].detach())


def _optimizer(params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, 0.01), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def build_row(name: str, ctx: Context, fresh_copy: bool = True) -> Row:
    """The student (and verbalizers) set up for one row; the teacher is shared, frozen.

    `fresh_copy` deep-copies them so several rows can live in one process; a memory
    subprocess, which builds one row only, uses the originals (no second copy in its RSS).
    """
    args = ctx.args
    student = copy.deepcopy(ctx.student) if fresh_copy else ctx.student
    if name in ("sft", "floor"):
        for p in student.parameters():
            p.requires_grad_(True)
        objective: nn.Module = SFTObjective(student)
        if name == "floor":
            assert ctx.teacher is not None
            for p in ctx.teacher.parameters():
                p.requires_grad_(False)
            objective = FloorObjective(ctx.teacher, objective)
        keep_index = False
    else:
        kind, mode = name.split("_")
        lora = LoraSection(enabled=mode == "lora", r=args.lora_r, alpha=args.lora_r)
        model, _ = prepare_trainable(student, get_adapter(student), lora, "interact", args.seed)
        s_verbs = copy.deepcopy(ctx.s_verbs) if fresh_copy else ctx.s_verbs
        loss_cfg = LossConfig(chunk_tokens=args.chunk_tokens, materialize_mib=args.materialize_mib)
        matcher = LayerMatcher(MatchConfig(variant="full", seed=args.seed))
        if kind == "online":
            assert ctx.teacher is not None
            objective = InteractionObjective(model, s_verbs, ctx.teacher, ctx.t_verbs, matcher, None, loss_cfg)
        else:
            assert ctx.cache_dir is not None
            objective = InteractionObjective(model, s_verbs, None, None, matcher, None, loss_cfg,
                                             teacher_cache=TeacherCache(ctx.cache_dir))
        keep_index = True
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    return Row(name, objective, _optimizer(params, args.lr), params, keep_index)


def count_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# ---------------------------------------------------------------------------------------------
# Memory (one subprocess per row)
# ---------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`), so RSS before a step is live memory only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory_in_this_process(name: str, ctx: Context) -> dict[str, Any]:
    """Warm-up, then peak RSS over `memory_steps` steps and the profiler's tensor peak of one more step."""
    args = ctx.args
    row = build_row(name, ctx, fresh_copy=False)
    batches = ctx.batches
    total = args.memory_warmup + args.memory_steps + 1
    for i in range(args.memory_warmup):
        row.step(batches[i % len(batches)], i, total)
    gc.collect()
    _trim_heap()
    rss_before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    for i in range(args.memory_warmup, args.memory_warmup + args.memory_steps):
        row.step(batches[i % len(batches)], i, total)
    peak = _proc_status_kib("VmHWM")
    i = total - 1
    tensors = tensor_peak_bytes(lambda: row.step(batches[i % len(batches)], i, total))
    return {
        "peak_rss_mib": peak / 1024,
        "step_rss_mib": (peak - rss_before) / 1024 if reset else None,
        "tensor_peak_mib": tensors / 2**20,
        "rss_before_mib": rss_before / 1024,
        "peak_reset": reset,
    }


def memory_subprocess(name: str, argv: Sequence[str], data_dir: Path, cache_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-row", name,
           "--data-dir", str(data_dir), "--cache-dir", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_MARK):
            return json.loads(line[len(MEMORY_MARK):])
    raise RuntimeError(f"memory run of {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# Timing (all rows in this process, interleaved)
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_rows(rows: Sequence[Row], batches: Sequence[Mapping[str, Any]], warmup: int, reps: int,
              seed: int) -> dict[str, list[float]]:
    """Seconds per step of every row; each repetition runs all rows once in a new random order."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    order = list(rows)
    rng = random.Random(seed)
    total = warmup + reps
    for rep in range(total):
        rng.shuffle(order)
        batch = batches[rep % len(batches)]
        for row in order:
            gc.collect()  # outside the timed region: a collection must not land in one row's step
            t0 = time.perf_counter()
            loss = row.step(batch, rep, total)
            dt = time.perf_counter() - t0
            if loss != loss:  # NaN: the numbers would still be timings, but of a broken run
                raise RuntimeError(f"row {row.name} produced a NaN loss at repetition {rep}")
            if rep >= warmup:
                times[row.name].append(dt)
    return times


def summarise(times: dict[str, list[float]], batch_size: int, finetune_modes: Sequence[str]) -> dict[str, Any]:
    rows = {}
    for name, ts in times.items():
        per_sample = [1000 * t / batch_size for t in ts]
        rows[name] = {
            "description": ROW_DESCRIPTIONS[name],
            "ms_per_sample_median": statistics.median(per_sample),
            "ms_per_sample_p90": percentile(per_sample, 0.9),
            "ms_per_sample_min": min(per_sample),
            "ms_per_step_median": 1000 * statistics.median(ts),
            "repetitions": len(ts),
        }
    ratios = {}
    for mode in finetune_modes:
        for num, den, goal in ((f"online_{mode}", "floor", GOAL_ONLINE_OVER_FLOOR),
                               (f"cached_{mode}", "sft", GOAL_CACHED_OVER_SFT)):
            med = rows[num]["ms_per_sample_median"] / rows[den]["ms_per_sample_median"]
            paired = statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
            ratios[f"{num}/{den}"] = {"ratio": med, "paired_median_ratio": paired, "goal": goal, "met": med <= goal}
    return {"rows": rows, "ratios": ratios}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| row | what | ms/sample median | p90 | peak RSS MiB | step RSS rise MiB | step tensor peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(x: float | None, nd: int = 1) -> str:
        return "n/a" if x is None else f"{x:.{nd}f}"

    for name, r in result["rows"].items():
        m = result.get("memory", {}).get(name, {})
        lines.append(
            f"| {name} | {r['description']} | {r['ms_per_sample_median']:.2f} | {r['ms_per_sample_p90']:.2f} | "
            f"{fmt(m.get('peak_rss_mib'))} | {fmt(m.get('step_rss_mib'))} | {fmt(m.get('tensor_peak_mib'))} |"
        )
    lines += ["", "| ratio (medians) | value | paired median | goal | met |", "|---|---:|---:|---:|---|"]
    for name, r in result["ratios"].items():
        lines.append(f"| {name} | {r['ratio']:.3f} | {r['paired_median_ratio']:.3f} | <= {r['goal']} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for who, hidden, layers, heads, kv, inter, vdepth, vwidth in (
        ("student", 128, 4, 4, 2, 512, 2, 64), ("teacher", 256, 8, 8, 4, 1024, 4, 128)
    ):
        p.add_argument(f"--{who}-hidden", type=int, default=hidden)
        p.add_argument(f"--{who}-layers", type=int, default=layers)
        p.add_argument(f"--{who}-heads", type=int, default=heads)
        p.add_argument(f"--{who}-kv-heads", type=int, default=kv)
        p.add_argument(f"--{who}-intermediate", type=int, default=inter)
        p.add_argument(f"--{who}-vision-depth", type=int, default=vdepth)
        p.add_argument(f"--{who}-vision-width", type=int, default=vwidth)
    p.add_argument("--student-stride", type=int, default=1, help="verbalized student layers: every stride-th...")
    p.add_argument("--student-start", type=int, default=1, help="...from start (configs/distill_tiny.yaml)")
    p.add_argument("--teacher-stride", type=int, default=2)
    p.add_argument("--teacher-start", type=int, default=1)
    p.add_argument("--vocab", type=int, default=512, help="student LM head rows (the tokenizer has <= 512 tokens)")
    p.add_argument("--teacher-vocab-extra", type=int, default=128, help="teacher pads this many rows more")
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=112 * 112)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-batches", type=int, default=4, help="distinct batches, cycled over the repetitions")
    p.add_argument("--chunk-tokens", type=int, default=256, help="LossConfig.chunk_tokens")
    p.add_argument("--materialize-mib", type=float, default=LossConfig.materialize_mib,
                   help="LossConfig.materialize_mib (0: always the chunked, recomputing path)")
    p.add_argument("--k", type=int, default=64, help="teacher cache top-k")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank = alpha (configs/distill_tiny.yaml)")
    p.add_argument("--finetune", choices=("lora", "full", "both"), default="lora")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (each runs every row once)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    p.add_argument("--memory-rows", default="all", help="comma-separated rows to measure memory of (all: every row)")
    p.add_argument("--memory-warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    # Internal: a memory subprocess measures one row.
    p.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.batch_size < 1 or args.num_batches < 1:
        p.error("--reps, --batch-size and --num-batches must be >= 1, --warmup >= 0")
    return args


def _setup_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def memory_child(args: argparse.Namespace) -> None:
    _setup_torch(args.threads)
    name = args.memory_row
    need_teacher = name == "floor" or name.startswith("online")
    ctx = build_context(args, args.data_dir, args.cache_dir, need_teacher)
    print(MEMORY_MARK + json.dumps(measure_memory_in_this_process(name, ctx)), flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.memory_row is not None:
        memory_child(args)
        return {}
    _setup_torch(args.threads)
    names = row_names(args.finetune)
    modes = FINETUNE_MODES if args.finetune == "both" else (args.finetune,)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distill_step_cost_") as tmp:
        data_dir, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        ctx = build_context(args, data_dir, cache_dir, need_teacher=True)
        cache_seconds = build_cache(ctx, cache_dir)
        batches = ctx.batches
        response_tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        shapes = {
            "student_params": count_params(ctx.student),
            "teacher_params": count_params(ctx.teacher) if ctx.teacher is not None else None,
            "student_targets": ctx.s_verbs.target_layers,
            "teacher_targets": ctx.t_verbs.target_layers if ctx.t_verbs is not None else None,
            "tokenizer_tokens": len(ctx.tokenizer),
            "sequence_length": [int(b["input_ids"].shape[1]) for b in batches],
            "response_tokens_per_batch": response_tokens,
        }
        memory: dict[str, Any] = {}
        if not args.no_memory:
            child_argv = list(raw)  # the same sizes; the child adds --memory-row
            wanted = names if args.memory_rows == "all" else [n.strip() for n in args.memory_rows.split(",")]
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise SystemExit(f"--memory-rows: {unknown} are not rows of this run ({names})")
            for name in [n for n in names if n in wanted]:
                print(f"[memory] {name} ...", file=sys.stderr, flush=True)
                memory[name] = memory_subprocess(name, child_argv, data_dir, cache_dir)
        rows = [build_row(name, ctx) for name in names]
        for row in rows:
            shapes[f"trainable_params_{row.name}"] = sum(p.numel() for p in row.params)
        print(f"[time] {len(rows)} rows x ({args.warmup} warm-up + {args.reps}) repetitions ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        times = time_rows(rows, batches, args.warmup, args.reps, args.seed)
        wall = time.perf_counter() - t0
    result = summarise(times, args.batch_size, modes)
    result["memory"] = memory
    result["cache_build_ms_per_sample"] = 1000 * cache_seconds / (args.batch_size * args.num_batches)
    result["shapes"] = shapes
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("memory_row", "data_dir", "cache_dir")}
    result["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "timing_wall_s": wall, "niceness": os.nice(0),
    }
    result["step_seconds"] = times
    result["command"] = "python benchmarks/distill_step_cost.py " + " ".join(shlex.quote(a) for a in raw)
    print(markdown(result))
    print(f"\ncache build: {result['cache_build_ms_per_sample']:.2f} ms/sample (one-off); "
          f"response tokens per batch {response_tokens}; loadavg {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
