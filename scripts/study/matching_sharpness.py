"""How much did the divergences steer a VLsI run's adaptive matching? (issue 19, H3's footnote)

    python scripts/study/matching_sharpness.py runs/rstudy/study/rows/vlsi_few/seed0/distill \
        [--batches 16] [--out docs/study/matching_sharpness/r_few_vlsi_seed0.json] [--against OTHER_RUN]

H3 asks whether the matches stay order-preserving; they must, by construction, whatever the
divergences say. What the study's heatmaps cannot show is whether the draws followed the
divergences at all: with the paper's adaptive temperature tau = scale / (max d - min d) the logits
-d / tau span (max d - min d)^2 / scale, so candidates a fraction of a nat apart are drawn almost
uniformly. This script rebuilds one finished run's step-2 objective twice (the student as step 2
found it, and as step 2 left it), runs it without gradients on training batches, and records for
every student target and batch the candidates' divergence spread and the probability the matcher
gave its likeliest candidate, with `LayerMatcher.probabilities`, the formula training drew from.
With `--against`, it also compares the matches two finished runs recorded step by step.

Why a script and not a training-time statistic: the runs it explains are archived and finished;
it costs a few forwards of a nano pair (seconds), and it needs no change to how runs train.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from vlsi_model.distill.adapters import get_adapter
from vlsi_model.distill.config import (
    INTERACTION_DIR,
    STUDENT_VERBALIZED_DIR,
    TEACHER_VERBALIZERS_DIR,
    DistillConfig,
    load_distill_config,
)
from vlsi_model.distill.interaction import InteractionObjective
from vlsi_model.distill.matching import LayerMatcher, MatchRecorder
from vlsi_model.distill.steps_common import check_same_tokenizer, load_dataset, load_model
from vlsi_model.distill.verbalizer import load_verbalizers, verbalizer_dir
from vlsi_model.training.dataset import make_collate_fn


class InspectingMatcher(LayerMatcher):
    """The run's own matcher, which also keeps, per student target, the candidates' spread
    (max d - min d, nats) and the probability of the likeliest candidate of each draw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draws: list[dict[str, Any]] = []

    def match(self, d: torch.Tensor | None, num_student: int, num_teacher: int) -> list[int]:
        matches = super().match(d, num_student, num_teacher)
        assert d is not None
        start = 0
        for s, t in enumerate(matches):
            lo, hi = self.window(s, start, num_student, num_teacher)
            candidates = d[s, lo:hi + 1].detach().double().cpu()
            if candidates.numel() > 1:  # one candidate: nothing was chosen
                p = self.probabilities(candidates)
                self.draws.append({"s": s, "spread": float(candidates.max() - candidates.min()),
                                   "p_max": float(p.max()), "uniform": 1.0 / candidates.numel()})
            start = t + 1
        return matches


def summarise(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Per student target: how many draws had a choice, the median and largest spread, the mean
    probability of the likeliest candidate beside the uniform one, and how often it exceeded 0.6."""
    out: dict[str, Any] = {}
    for s in sorted({d["s"] for d in draws}):
        mine = [d for d in draws if d["s"] == s]
        out[str(s)] = {"draws": len(mine),
                       "spread_median": statistics.median(d["spread"] for d in mine),
                       "spread_max": max(d["spread"] for d in mine),
                       "p_max_mean": statistics.fmean(d["p_max"] for d in mine),
                       "uniform": statistics.fmean(d["uniform"] for d in mine),
                       "share_p_max_over_0.6": sum(d["p_max"] > 0.6 for d in mine) / len(mine)}
    return out


def recorded_matches(run: Path) -> dict[int, tuple[int, ...]]:
    """Step -> the teacher target of each student target, from the run's step-2 records (read by
    the recorder that wrote them)."""
    recorder = MatchRecorder([], [])
    for path in sorted((run / "runs" / "interact").glob("matches_rank*.jsonl")):
        recorder.extend_from_file(path)
    by_step: dict[int, dict[int, int]] = {}
    for step, s, t in recorder.records:
        by_step.setdefault(step, {})[s] = t
    return {step: tuple(m[s] for s in sorted(m)) for step, m in by_step.items()}


def same_matches(run: Path, other: Path) -> dict[str, Any]:
    """The share of step-2 steps at which two runs drew the very same matches. Runs of one matching
    seed draw from one random stream: if the divergences steered the draws, runs that saw other
    data or another verbalizer would part ways; if they agree step after step, the stream decided."""
    mine, theirs = recorded_matches(run), recorded_matches(other)
    steps = sorted(set(mine) & set(theirs))
    if not steps:
        raise SystemExit(f"{run} and {other} have no step-2 step in common")
    return {"against": str(other), "steps": len(steps),
            "same_share": sum(mine[s] == theirs[s] for s in steps) / len(steps)}


def inspect_stage(cfg: DistillConfig, teacher: Any, t_verbs: Any, dataset: Any, student_dir: Path, batches: int,
                  seed: int) -> dict[str, Any]:
    """The matcher's draws over `batches` training micro-batches with the student in `student_dir`
    (the teacher, its verbalizers and the dataset are the run's, loaded once for both stages)."""
    student, tokenizer, _ = load_model(student_dir, cfg.student.dtype)
    s_verbs = load_verbalizers(verbalizer_dir(student_dir),
                               expect_hidden_size=get_adapter(student).hidden_size(student))
    matcher = InspectingMatcher(cfg.matching)
    objective = InteractionObjective(student, s_verbs, teacher, t_verbs, matcher, loss_config=cfg.loss).eval()
    collate = make_collate_fn(int(tokenizer.pad_token_id))
    size = cfg.train_config("interact", "interact").per_device_batch_size
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        for b in range(batches):
            objective(collate([dataset[i] for i in order[b * size:(b + 1) * size]]))
    return {"student": str(student_dir), "batches": batches, "batch_size": size,
            "by_student_target": summarise(matcher.draws)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished VLsI row's distill directory (with distill_config.yaml)")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which training samples are drawn")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another run's distill directory: the share of steps both drew the same matches "
                             "(repeatable)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    agreement = [same_matches(args.run, other) for other in args.against]  # fail before the slow part
    cfg = load_distill_config(args.run / "distill_config.yaml")
    if cfg.matching.variant != "full":
        raise SystemExit(f"{args.run}: matching variant {cfg.matching.variant!r}, not the adaptive 'full' one")
    teacher, t_tokenizer, _ = load_model(cfg.teacher.path, cfg.teacher.dtype)
    t_verbs = load_verbalizers(args.run / TEACHER_VERBALIZERS_DIR,
                               expect_hidden_size=get_adapter(teacher).hidden_size(teacher))
    # The dataset as step 2 built it: with the student's tokenizer and image processor (one dataset
    # for both stages, the slow part on a large pool).
    _, tokenizer, image_processor = load_model(args.run / STUDENT_VERBALIZED_DIR, cfg.student.dtype)
    check_same_tokenizer(t_tokenizer, tokenizer)
    dataset = load_dataset(cfg, tokenizer, image_processor)
    stages = (("start of step 2", STUDENT_VERBALIZED_DIR), ("end of step 2", INTERACTION_DIR))
    report = {"run": str(args.run), "scale": cfg.matching.scale,
              "stages": {name: inspect_stage(cfg, teacher, t_verbs, dataset, args.run / sub, args.batches, args.seed)
                         for name, sub in stages}, "same_matches": agreement}
    for name, stage in report["stages"].items():
        for s, row in stage["by_student_target"].items():
            print(f"{name}, student target {s}: {row['draws']} draws with a choice; spread median "
                  f"{row['spread_median']:.4f} nats (max {row['spread_max']:.4f}); likeliest candidate "
                  f"p {row['p_max_mean']:.3f} (uniform {row['uniform']:.3f}), "
                  f"> 0.6 in {row['share_p_max_over_0.6']:.0%}")
    for row in agreement:
        print(f"same matches as {row['against']}: {row['same_share']:.4f} of {row['steps']} steps")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
