"""Exact-match VQA evaluation per question family: what `vlsi eval` runs.

Any model an engine can load (the shipped student, a `vlsi train` / `vlsi distill` output, a
real Qwen2-VL checkpoint) is scored on a LLaVA-format file (the scene generator's test
split, or a user's own data). Answers are produced by the *serving* engine with greedy
decoding, one sample at a time, so the accuracy reported is the accuracy the robot gets:
no separate batched decode path whose padding or position handling could differ from
`Engine.answer`. (For the nano models a sample costs ~10 ms on CPU; 3,000 samples take
about a minute.)

Scoring: `answers.exact_match` (normalised: case, punctuation, number words, articles); with
`open_forms`, also content match and set-F1 (`data/open_answers.py`).
Records carry "family" (the scene generator writes it); records without one are grouped
under "all". Each family's *answer prior* (share of its most frequent reference answer) is
reported beside its accuracy, because on yes/no or small closed answer sets a model that
always says the majority answer already scores 0.5+: accuracy means little without it.
Multi-turn records are scored on their first turn only (the image-grounded one).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlsi_model.answers import exact_match, normalize_answer

NO_FAMILY = "all"


@dataclass(frozen=True)
class EvalSample:
    """One scored question: its image (absolute path), question, reference answer and family."""

    index: int
    record_id: str | None
    image: Path
    question: str
    reference: str
    family: str


@dataclass
class FamilyScore:
    n: int = 0
    correct: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # normalised reference answers
    predicted: Counter[str] = field(default_factory=Counter)  # normalised predictions

    def add(self, reference: str, prediction: str, ok: bool) -> None:
        self.n += 1
        self.correct += int(ok)
        self.answers[normalize_answer(reference)] += 1
        self.predicted[normalize_answer(prediction)] += 1

    def to_dict(self, top: int = 3) -> dict[str, Any]:
        """JSON form; `top_predictions` shows a constant answer at a glance (a model stuck on the prior)."""
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct, "prior": self.prior,
                "majority_answer": self.answers.most_common(1)[0][0] if self.n else None,
                "top_predictions": [[a, c] for a, c in self.predicted.most_common(top)]}

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def prior(self) -> float:
        """Accuracy of always giving this family's most frequent reference answer."""
        return self.answers.most_common(1)[0][1] / self.n if self.n else 0.0


def teacher_references(records: Sequence[Any]) -> Counter[str]:
    """Teachers whose answers stand as references in `records` (`label.source: teacher`), with counts."""
    from vlsi_model.data.labelling import is_teacher_labelled

    return Counter(str(r["label"].get("teacher", "?")) for r in records if is_teacher_labelled(r))


def load_eval_samples(data_file: str | os.PathLike[str], max_samples: int | None = None,
                      allow_teacher_labels: bool = False) -> list[EvalSample]:
    """The first-turn (question, answer) of every record of a LLaVA JSON/JSONL file.

    Image paths are resolved against the file's folder, as in training. A malformed record
    raises `DatasetError` naming it: an evaluation that silently drops records reports an
    accuracy over a set nobody chose.
    """
    from vlsi_model.data.llava import DatasetError, RecordError, parse_conversations, read_records

    path = Path(data_file).expanduser()
    records = read_records(path)
    teachers = teacher_references(records[:max_samples] if max_samples is not None else records)
    if teachers and not allow_teacher_labels:
        raise DatasetError(
            f"{path}: {sum(teachers.values())} records hold a teacher's answer ({', '.join(teachers)}), not ground "
            "truth; scoring against them measures agreement with that teacher. Evaluate on labelled data, or "
            "pass --allow-teacher-labels to measure the agreement knowingly")
    out: list[EvalSample] = []
    for index, record in enumerate(records):
        if max_samples is not None and len(out) >= max_samples:
            break
        try:
            image, turns = parse_conversations(record)
        except RecordError as exc:
            raise DatasetError(f"{path} record {index}: {exc}") from None
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        family = record.get("family") or NO_FAMILY
        rid = record.get("id")
        out.append(EvalSample(index, str(rid) if rid is not None else None, image_path, turns[0][0], turns[0][1],
                              str(family)))
    if not out:
        raise DatasetError(f"{path}: no records to evaluate")
    return out


def _regions(answer: str) -> Counter[tuple[str, str]]:
    """{(colour shape, region): count} of a positions answer ("red circle top left, blue square
    middle right"); items that are not four words (a model's malformed output) are ignored."""
    items = (normalize_answer(item).split() for item in answer.split(","))
    return Counter((" ".join(w[:2]), " ".join(w[2:])) for w in items if len(w) == 4)


def score_object_regions(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-object score of the "Where is each object?" answers among `rows` (None without any):
    the share of reference objects the prediction names with their region, beside the prior of
    naming every object's most frequent region.

    Why: the whole answer must be exact for exact match, so one misplaced object of five scores
    like five; this says how many objects a robot is told the right place of. It is recall only:
    an object the answer invents costs nothing here (exact match counts it).
    """
    references: Counter[tuple[str, str]] = Counter()
    right = 0
    for row in rows:
        if row["family"] != "positions":
            continue
        ref = _regions(row["reference"])
        references += ref
        right += sum((ref & _regions(row["prediction"])).values())
    n = sum(references.values())
    if not n:
        return None
    by_region = Counter(region for (_, region), count in references.items() for _ in range(count))
    region, top = by_region.most_common(1)[0]
    return {"accuracy": right / n, "objects": n, "correct": right, "prior": top / n, "majority_region": region}


def score(samples: Sequence[EvalSample], predictions: Sequence[str], open_forms: bool = False) -> dict[str, Any]:
    """Per-family and overall accuracy of `predictions` (aligned with `samples`), plus the rows.
    `open_forms` adds "content": the scores that see through synonyms, list order and number
    words (`vlsi_model.data.open_answers.score_content`), for answers with many valid forms.

    Pure function of its inputs, so the scoring is testable without any model.
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    from vlsi_model.data.question_families import question_type
    families: dict[str, FamilyScore] = {}
    types: dict[str, FamilyScore] = {}
    rows = []
    for s, pred in zip(samples, predictions, strict=True):
        ok = exact_match(pred, s.reference)
        families.setdefault(s.family, FamilyScore()).add(s.reference, pred, ok)
        kind = question_type(s.question)
        if kind is not None:
            types.setdefault(kind, FamilyScore()).add(s.reference, pred, ok)
        rows.append({"index": s.index, "id": s.record_id, "family": s.family, "question": s.question,
                     "reference": s.reference, "prediction": pred, "correct": ok})
    total = sum(f.n for f in families.values())
    correct = sum(f.correct for f in families.values())
    out = {
        "overall": {"accuracy": correct / total if total else 0.0, "n": total, "correct": correct},
        "families": {name: f.to_dict() for name, f in sorted(families.items())},
        # the synthetic scenes' question templates (none for other data): see question_families.question_type
        "question_types": {name: f.to_dict() for name, f in sorted(types.items())},
        "predictions": rows,
    }
    regions = None if open_forms else score_object_regions(rows)  # it reads the generator's form only
    if regions is not None:
        out["object_regions"] = regions
    if open_forms:
        from vlsi_model.data.open_answers import score_content

        out["content"] = score_content(rows)
    return out


def evaluate(
    model_dir: str | os.PathLike[str] | None,
    data_file: str | os.PathLike[str],
    max_samples: int | None = None,
    backend: str = "torch",
    max_new_tokens: int = 16,
    progress: bool = False,
    engine: Any = None,
    on_sample: Callable[[int, int], None] | None = None,
    allow_teacher_labels: bool = False,
    open_forms: bool = False,
) -> dict[str, Any]:
    """Greedy answers of the model at `model_dir` (None: the default student) on `data_file`, scored.

    Returns `score(...)` plus "model", "data", "backend" and timing. Pass an already loaded
    `engine` to score without reloading (the study script does so between runs). A file whose
    references are a teacher's answers is refused unless `allow_teacher_labels`; then the result's
    "references" names the teacher ("ground truth" otherwise).
    """
    from vlsi_model.data.llava import load_image, read_records

    samples = load_eval_samples(data_file, max_samples, allow_teacher_labels)
    teachers = teacher_references(read_records(Path(data_file).expanduser())) if allow_teacher_labels else Counter()
    owns_engine = engine is None
    if engine is None:
        from vlsi_model.engine import load_engine

        engine = load_engine(model_dir, backend)
    images: dict[Path, Any] = {}
    predictions = []
    t0 = time.perf_counter()
    iterator: Any = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="eval", unit="q")
    try:
        for k, s in enumerate(iterator):
            if s.image not in images:
                images = {s.image: load_image(s.image)}  # records of one image are adjacent: cache one
            predictions.append(engine.answer(images[s.image], s.question, max_new_tokens=max_new_tokens).text)
            if on_sample is not None:
                on_sample(k + 1, len(samples))
    finally:
        if owns_engine:
            engine.close()
    elapsed = time.perf_counter() - t0
    result = score(samples, predictions, open_forms=open_forms)
    return {
        "model": str(model_dir) if model_dir is not None else "default",
        "data": str(data_file),
        "backend": backend,
        "max_new_tokens": max_new_tokens,
        "seconds": elapsed,
        "references": "teacher: " + ", ".join(teachers) if teachers else "ground truth",
        **result,
    }


def write_results(results: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write results JSON atomically (a crash never leaves a truncated file that parses)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: family, n, accuracy, answer prior (majority answer), plus the overall row."""
    lines = ["| family | n | accuracy | prior (majority answer) |", "|---|---:|---:|---:|"]
    for name, f in results["families"].items():
        lines.append(f"| {name} | {f['n']} | {f['accuracy']:.3f} | {f['prior']:.3f} ({f['majority_answer']}) |")
    o = results["overall"]
    lines.append(f"| **overall** | {o['n']} | **{o['accuracy']:.3f}** | |")
    if r := results.get("object_regions"):
        lines.append(f"\nObjects named with their right region in the positions answers: **{r['accuracy']:.3f}** of "
                     f"{r['objects']} (prior {r['prior']:.3f}: always \"{r['majority_region']}\"; objects an "
                     "answer adds that are not there are not counted against it).")
    if c := results.get("content"):
        f1 = f"; mean set-F1 of the list answers {c['list_set_f1']:.3f} ({c['list_n']})" if c["list_n"] else ""
        lines.append(f"\nContent match (synonyms, list order and number words seen through): **{c['accuracy']:.3f}** "
                     f"of {c['n']}{f1}.")
    return "\n".join(lines)


def format_question_type_table(results: dict[str, Any]) -> str:
    """Markdown table per question template (empty string when the data has none): accuracy,
    prior and the model's most frequent answers, so a constant answer shows."""
    types = results.get("question_types") or {}
    if not types:
        return ""
    lines = ["| question type | n | accuracy | prior (majority answer) | top predictions |", "|---|---:|---:|---:|---|"]
    for name, t in types.items():
        top = ", ".join(f"{a} {c}" for a, c in t.get("top_predictions", []))
        lines.append(f"| {name} | {t['n']} | {t['accuracy']:.3f} | {t['prior']:.3f} ({t['majority_answer']}) "
                     f"| {top} |")
    return "\n".join(lines)


__all__ = [
    "NO_FAMILY",
    "EvalSample",
    "evaluate",
    "format_question_type_table",
    "format_table",
    "load_eval_samples",
    "score",
    "score_object_regions",
    "write_results",
]
