"""Check that the study inputs rebuilt under runs/ are the ones the archived results were measured on.

    python scripts/study/check_inputs.py r_open [r_unlabelled]          # check; exit 1 on a difference
    python scripts/study/check_inputs.py r_unlabelled --record           # also record inputs not yet digested

Why: runs/ does not survive a fresh checkout, so every session rebuilds the inputs
(scripts/study/prepare_inputs.sh) and adds rows beside rows archived from earlier builds. A paired
comparison across seeds is only sound if those builds are the same. Three checks:

1. the test split: every archived (row, seed) result keeps its answers in test-file order; scored
   against the rebuilt split they must give the archived number of correct answers, row by row (by
   content and, in R-open, by exact match too, which sees the open forms' seeds);
2. the teacher: the one the regime's rows use from now on (R-open: teacher v2, kept in the
   repository since training it again on another CPU type gave other answers, amendment 5;
   R-unlabelled: the shipped student) answers the rebuilt test split with its recorded answers,
   every one, and scores its recorded figure on the validation split;
3. the training inputs: each set's JSON, its images, and each teacher-label file's answers are hashed
   (SHA-256) and compared with docs/study/inputs_sha256.json. That file was recorded from a build
   that passed checks 1-2 (and, for label files, the archived agreement with the true answers);
   `--record` adds the digests of inputs present here but not yet recorded, after the other checks pass.

Uses one thread (the archived rows did).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import vlsi_study  # noqa: E402  (benchmarks/ is not a package)

DIGESTS = REPO / "docs" / "study" / "inputs_sha256.json"


@dataclass(frozen=True)
class Regime:
    test: str
    val: str
    archive: str
    teacher: str
    teacher_record: str  # the teacher's evaluation (a study result file): its answers and validation score
    open_forms: bool
    max_new_tokens: int
    sets: tuple[str, ...]  # training sets (JSON files whose images sit beside them)
    labels: tuple[str, ...]  # teacher-label files: their answers are hashed (not the probabilities)


SHARED_SETS = ("runs/rstudy/labelled/train_mix.json", "runs/rstudy/pool/train_mix.json",
               "runs/rstudy/pool/pool_questions.json", "runs/rstudy/test/test.json", "runs/rstudy/val/val.json")
REGIMES = {
    "r_unlabelled": Regime("runs/rstudy/test/test.json", "runs/rstudy/val/val.json", "docs/study/r_unlabelled",
                           "vlsi_model/assets/default_student", "docs/study/r_unlabelled/teacher/all.json",
                           open_forms=False, max_new_tokens=16,
                           sets=SHARED_SETS, labels=("runs/rstudy/pool/pool_teacher.json",)),
    "r_open": Regime("runs/ropen/test.json", "runs/ropen/val.json", "docs/study/r_open/arms",
                     "runs/ropen/teacher/final", "docs/study/r_open/teacher_v2_eval/teacher/all.json",
                     open_forms=True, max_new_tokens=64,
                     sets=SHARED_SETS + ("runs/ropen/labelled.json", "runs/ropen/pool_true.json",
                                         "runs/ropen/test.json", "runs/ropen/val.json"),
                     labels=("runs/ropen/pool_teacher.json",)),
}

def check_archived_answers(regime: Regime) -> list[str]:
    """Rescore every archived result's answers against the rebuilt test split; the differences."""
    from vlsi_model.evaluation import load_eval_samples, score

    samples = load_eval_samples(REPO / regime.test)
    problems = []
    results = [path for _, _, path in vlsi_study.archived_result_files(REPO / regime.archive)]
    for path in results:
        result = json.loads(path.read_text())
        answers = result.get("answers")
        if not answers or len(answers) != len(samples):
            problems.append(f"{path}: {len(answers or [])} answers, the rebuilt test split has {len(samples)} "
                            "questions")
            continue
        scored = score(samples, answers, open_forms=regime.open_forms)
        pairs = [("correct", scored["content"]["correct"] if regime.open_forms else scored["overall"]["correct"],
                  result["overall"]["correct"])]
        if regime.open_forms:  # the forms themselves: exact match sees a different open-forms seed
            pairs.append(("exact-match correct", scored["overall"]["correct"], result["exact"]["overall"]["correct"]))
        problems += [f"{path}: {got} {what} against the rebuilt test split, {want} archived"
                     for what, got, want in pairs if got != want]
    print(f"{regime.archive}: {len(results)} archived results rescored on {regime.test}: "
          f"{'all equal' if not problems else f'{len(problems)} differences'}")
    return problems


def check_teacher(regime: Regime) -> list[str]:
    """The teacher's answers on the rebuilt test split against its recorded evaluation's."""
    from vlsi_model.engine import load_engine
    from vlsi_model.evaluation import evaluate

    archived = json.loads((REPO / regime.teacher_record).read_text())
    teacher = REPO / regime.teacher
    if not (teacher / "config.json").is_file():
        return [f"{teacher}: no model (run scripts/study/prepare_inputs.sh first)"]
    problems = []
    engine = load_engine(teacher, "torch")
    try:
        test, val = (evaluate(teacher, REPO / split, max_new_tokens=regime.max_new_tokens, engine=engine,
                              open_forms=regime.open_forms) for split in (regime.test, regime.val))
    finally:
        engine.close()
    answers, want = [p["prediction"] for p in test["predictions"]], archived["answers"]
    differ = [i for i in range(max(len(answers), len(want)))
              if i >= len(answers) or i >= len(want) or answers[i] != want[i]]
    if differ:
        i = differ[0]
        problems.append(f"{teacher}: {len(differ)} of {len(want)} archived test answers differ (first at question "
                        f"{i}: {answers[i] if i < len(answers) else None!r} vs {want[i] if i < len(want) else None!r})")
    got = (val["content"] if regime.open_forms else val["overall"])["accuracy"]
    want_val = archived["extra"]["val"]["overall"]["accuracy"]
    if abs(got - want_val) > 1e-12:
        problems.append(f"{teacher}: {got:.6f} on the rebuilt validation split, {want_val:.6f} archived")
    print(f"teacher {regime.teacher}: {len(want) - len(differ)} of {len(want)} archived test answers given; "
          f"validation {got:.4f} (archived {want_val:.4f})")
    return problems


def set_digest(path: Path) -> str:
    """SHA-256 over a set's records and the pixels of every image they name, in record order.

    The records are hashed as parsed (keys sorted) and the images decoded, not their files' bytes:
    the same content written by another JSON formatting or another zlib must count as the same."""
    import numpy as np
    from PIL import Image

    from vlsi_model.data.llava import read_records

    records = read_records(path)
    h = hashlib.sha256(json.dumps(records, sort_keys=True).encode())
    seen: set[str] = set()
    for record in records:
        image = str(record.get("image", ""))
        if image and image not in seen:
            seen.add(image)
            with Image.open(path.parent / image) as im:
                pixels = np.asarray(im.convert("RGB"))
            h.update(image.encode() + str(pixels.shape).encode() + pixels.tobytes())
    return h.hexdigest()


def labels_digest(path: Path) -> str:
    """SHA-256 over a teacher-label file's (image, question, answer) triples: what training reads
    (the token probabilities beside them are left out, as a float's last digit may vary by platform)."""
    from vlsi_model.data.llava import read_records

    triples = [(r.get("image"), r["conversations"][0]["value"], r["conversations"][1]["value"])
               for r in read_records(path)]
    return hashlib.sha256(json.dumps(triples).encode()).hexdigest()


def check_digests(regime: Regime, recorded: dict[str, str], record: bool) -> list[str]:
    """Each training input's digest against the recorded one; `record` adds the ones not recorded."""
    problems, added = [], []
    for rel, digest in [(p, set_digest) for p in regime.sets] + [(p, labels_digest) for p in regime.labels]:
        path = REPO / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (run scripts/study/prepare_inputs.sh first)")
            continue
        got = digest(path)
        if rel not in recorded:
            if record:
                recorded[rel] = got
                added.append(rel)
            else:
                problems.append(f"{rel}: no recorded digest (check it, then run again with --record)")
        elif recorded[rel] != got:
            problems.append(f"{rel}: its content differs from the recorded build (SHA-256 {got[:12]}, "
                            f"recorded {recorded[rel][:12]})")
    print(f"training inputs: {len(regime.sets) + len(regime.labels)} digests compared"
          + (f"; recorded {', '.join(added)}" if added else ""))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("regimes", nargs="+", choices=sorted(REGIMES))
    p.add_argument("--skip-teacher", action="store_true", help="no model runs (checks 1 and 3 only)")
    p.add_argument("--record", action="store_true",
                   help="record the digests of inputs not yet in docs/study/inputs_sha256.json (when checks 1-2 pass)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {}
    problems = []
    for name in dict.fromkeys(args.regimes):
        regime = REGIMES[name]
        problems += check_archived_answers(regime)
        if not args.skip_teacher:
            problems += check_teacher(regime)
        problems += check_digests(regime, recorded, record=args.record and not problems)
    if args.record and not problems:
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    for line in problems:
        print("DIFFERS:", line, file=sys.stderr)
    print("inputs as archived" if not problems else f"{len(problems)} differences: the rebuilt inputs are not the "
          "archived ones; do not add rows to the archive from them")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
