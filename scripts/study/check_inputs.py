"""Check that the study inputs rebuilt under runs/ are the ones the archived results were measured on.

    python scripts/study/check_inputs.py r_open [r_unlabelled]

Why: runs/ does not survive a fresh checkout, so every session rebuilds the inputs
(scripts/study/prepare_inputs.sh) and adds rows beside rows archived from earlier builds. A paired
comparison across seeds is only sound if those builds are the same, so two checks, answer by answer:

1. the test split: every archived (row, seed) result keeps its answers in test-file order; scored
   against the rebuilt split they must give the archived number of correct answers, row by row;
2. the teacher: rebuilt (R-open) or shipped (R-unlabelled), it answers the rebuilt test split with the
   archived teacher row's answers, every one, and scores the archived figure on the validation split
   (which also checks that split).

Exit status 1, naming what differs, if anything does. Uses one thread (the archived rows did).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Regime:
    test: str
    val: str
    archive: str
    teacher: str
    open_forms: bool
    max_new_tokens: int


REGIMES = {
    "r_unlabelled": Regime("runs/rstudy/test/test.json", "runs/rstudy/val/val.json", "docs/study/r_unlabelled",
                           "vlsi_model/assets/default_student", open_forms=False, max_new_tokens=16),
    "r_open": Regime("runs/ropen/test.json", "runs/ropen/val.json", "docs/study/r_open/arms",
                     "runs/ropen/teacher/final", open_forms=True, max_new_tokens=64),
}


def correct_count(result: dict[str, Any], open_forms: bool) -> int:
    """The number of correct answers a scored result counts by the regime's primary metric."""
    return result["content"]["correct"] if open_forms else result["overall"]["correct"]


def check_archived_answers(regime: Regime) -> list[str]:
    """Rescore every archived result's answers against the rebuilt test split; the differences."""
    from vlsi_model.evaluation import load_eval_samples, score

    samples = load_eval_samples(REPO / regime.test)
    problems = []
    archived = sorted((REPO / regime.archive).glob("*/*.json"))
    for path in archived:
        result = json.loads(path.read_text())
        answers = result.get("answers")
        if not answers:
            continue
        if len(answers) != len(samples):
            problems.append(f"{path}: {len(answers)} answers, the rebuilt test split has {len(samples)} questions")
            continue
        rescored = correct_count(score(samples, answers, open_forms=regime.open_forms), regime.open_forms)
        if rescored != result["overall"]["correct"]:
            problems.append(f"{path}: {rescored} correct against the rebuilt test split, "
                            f"{result['overall']['correct']} archived")
    print(f"{regime.archive}: {len(archived)} archived results rescored on {regime.test}: "
          f"{'all equal' if not problems else f'{len(problems)} differ'}")
    return problems


def check_teacher(regime: Regime) -> list[str]:
    """The teacher's answers on the rebuilt test split against the archived teacher row's."""
    from vlsi_model.evaluation import evaluate

    archived = json.loads((REPO / regime.archive / "teacher" / "all.json").read_text())
    teacher = REPO / regime.teacher
    if not (teacher / "config.json").is_file():
        return [f"{teacher}: no model (run scripts/study/prepare_inputs.sh first)"]
    problems = []
    test = evaluate(teacher, REPO / regime.test, max_new_tokens=regime.max_new_tokens, open_forms=regime.open_forms)
    answers = [p["prediction"] for p in test["predictions"]]
    differ = [i for i, (a, b) in enumerate(zip(answers, archived["answers"], strict=True)) if a != b]
    if differ:
        problems.append(f"{teacher}: {len(differ)} of {len(answers)} test answers differ from the archived "
                        f"teacher's (first at question {differ[0]}: {answers[differ[0]]!r} vs "
                        f"{archived['answers'][differ[0]]!r})")
    val = evaluate(teacher, REPO / regime.val, max_new_tokens=regime.max_new_tokens, open_forms=regime.open_forms)
    got = (val["content"] if regime.open_forms else val["overall"])["accuracy"]
    want = archived["extra"]["val"]["overall"]["accuracy"]
    if abs(got - want) > 1e-12:
        problems.append(f"{teacher}: {got:.6f} on the rebuilt validation split, {want:.6f} archived")
    print(f"teacher {regime.teacher}: {len(answers) - len(differ)} of {len(answers)} test answers as archived; "
          f"validation {got:.4f} (archived {want:.4f})")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("regimes", nargs="+", choices=sorted(REGIMES))
    p.add_argument("--skip-teacher", action="store_true", help="only rescore the archived answers (no model runs)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    problems = []
    for name in args.regimes:
        regime = REGIMES[name]
        problems += check_archived_answers(regime)
        if not args.skip_teacher:
            problems += check_teacher(regime)
    for line in problems:
        print("DIFFERS:", line, file=sys.stderr)
    print("inputs as archived" if not problems else f"{len(problems)} differences: the rebuilt inputs are not the "
          "archived ones; do not add rows to the archive from them")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
