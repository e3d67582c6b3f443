"""The VLsI paper's claims reproduced in miniature on the nano family (teacher -> student).

    python benchmarks/vlsi_study.py --teacher runs/nano/teacher/final \\
        --train-data runs/nano/data/train_mix.json --test-data runs/nano/test/test.json \\
        --out runs/vlsi_study --seeds 0,1,2 --budget 2000
    python benchmarks/vlsi_study.py --smoke --out /tmp/study     # every row, tiny models, 1-2 steps

Rows (each a `vlsi distill` config generated from the row's overrides, or plain SFT):

* teacher: the teacher itself (evaluated once);
* student_init: the student every row starts from (a pretrained student given by
  --student-init, evaluated once; or the fresh random init of each seed);
* student_sft: the student fine-tuned with plain SFT only (the paper's "SFT" baseline);
* final_kl_only: classic distillation (final-output KL, no verbalized layers) + step 3;
* vlsi_full: the full method (adaptive temperature, order-preserving window, KLD/KLD, step 3);
* match_*: the matching ablation (random, uniform, bottom1, bottom3, multinomial, window,
  order; "full" is vlsi_full);
* ops_ce_none, ops_kld_none: intermediate / last-layer operation ablation (KLD/KLD = full);
* no_step3: steps 1-2 only (the paper: worse than the baseline under greedy decoding);
* cached_teacher: as vlsi_full, with the teacher's top-k distributions precomputed;
* R-unlabelled (docs/study/preregistration.md; `--source labels=FILE --source teacher=FILE
  --source true=FILE`): sft_labels (A1), sft_pseudo (A2, sequence-level KD), final_kd_t1 /
  final_kd_t2 (A3, A3b), vlsi_pool (A4), vlsi_plain (A5, residual: false), oracle (O). Their
  results also get the pre-registered paired comparisons with 95% intervals (H1, H2, and the
  data-limited check), and `--archive DIR` keeps every finished (row, seed) result as a small JSON
  that counts as finished in a later session.

Same trainable weights: no row trains the student's vision encoder (merger included) unless
--train-vision is given, because the nano student was trained on a frozen random one and a
trained merger erodes the shape information it reads (`models.freeze_vision`). What the
interaction step trains is --interact-trains: the decoder layers (the paper's choice, for a
pretrained student), or the whole language model (+ token embeddings, final norm, LM head): the
default for --student-init random, whose random embeddings and head SFT trains from the first
step and a decoder-only step 2 would leave random.

Equal student compute: every trained row spends `--budget` optimizer steps on the student
backbone (distillation rows: interaction + SFT = budget; no_step3: interaction = budget;
student_sft: SFT = budget), at the same batch size. The verbalization step (step 1) trains
only the verb-FFN heads on frozen backbones; it is identical for every row of one seed, so it
runs once per seed (out/shared/seed<k>/) and is copied into each row.

Parallel: start the same command several times (one process per core with --threads 1, or one
per GPU with CUDA_VISIBLE_DEVICES): each (row, seed) is claimed with a file lock that dies with
its process, so the processes share the rows instead of repeating them; a row another process
holds is skipped (its result joins the table if it finished). Re-run with --report-only at the
end for the table over everything that finished.

R-open (`--open-forms`, data from `vlsi data open-forms`): content match (synonyms, list order
and number words seen through) is every figure; each result keeps its exact match under "exact".

Resumable: a (row, seed) whose eval.json exists is skipped; an unfinished one resumes (its
completed pipeline steps are skipped, its running step continues from its newest trainer
checkpoint). Device-agnostic: training runs on CUDA when available (accelerate picks it),
evaluation too. Output: out/results.md (table: mean +- std over seeds of overall and
per-family exact-match accuracy on the test split), out/results.json, out/matching_heatmap.png
(the full method's early/late matches, paper Fig. 5) and out/matching_variants.png (the
match frequencies of every matching variant over its whole run, side by side).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("vlsi_study")

NANO_STUDENT_TARGETS = {"stride": 1, "start": 1}  # nano student 4 layers: 1, 2, 3
NANO_TEACHER_TARGETS = {"stride": 2, "start": 1}  # nano teacher 8 layers: 1, 3, 5, 7
NANO_LORA = {"enabled": False}  # nano models are tiny: full fine-tuning of the decoder in step 2
MATCH_VARIANTS = ("random", "uniform", "bottom1", "bottom3", "multinomial", "window", "order")


@dataclass(frozen=True)
class Row:
    """One table row: how the student is trained (kind) and the distill-config overrides."""

    name: str
    kind: str  # "teacher" | "init" | "sft" | "distill"
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = ("verbalize", "interact", "sft")
    group: str = "main"
    data: tuple[str, ...] = ()  # named --source files it trains on (concatenated); () = --train-data


def study_rows() -> list[Row]:
    """Every row of the study, in table order (paper's tables: main, matching, ops, steps, cost)."""
    rows = [
        Row("teacher", "teacher", "teacher"),
        Row("student_init", "init", "student before the budget (its init)"),
        Row("student_sft", "sft", "student: SFT only"),
        Row("final_kl_only", "distill", "student: final-layer KL + SFT",
            {"loss": {"intermediate_weight": 0.0, "last_op": "kld"}}),
        Row("vlsi_full", "distill", "student: VLsI (full)"),
    ]
    rows += [Row(f"match_{v}", "distill", f"matching: {v}", {"matching": {"variant": v}}, group="matching")
             for v in MATCH_VARIANTS]
    rows += [
        Row("ops_ce_none", "distill", "ops: CE / none", {"loss": {"intermediate_op": "ce", "last_op": "none"}},
            group="ops"),
        Row("ops_kld_none", "distill", "ops: KLD / none", {"loss": {"intermediate_op": "kld", "last_op": "none"}},
            group="ops"),
        Row("no_step3", "distill", "without step 3 (steps 1-2)", steps=("verbalize", "interact"), group="steps"),
        Row("cached_teacher", "distill", "cached teacher (top-k)", {"teacher_cache": {"enabled": True}},
            group="cost"),
    ]
    # R-unlabelled (docs/study/preregistration.md): few labels, a pool the teacher labelled, the
    # pool's true labels for the oracle. --source labels=FILE --source teacher=FILE --source true=FILE.
    pool = ("labels", "teacher")
    final_kd = {"loss": {"intermediate_weight": 0.0, "last_op": "kld"}}
    rows += [
        Row("sft_labels", "sft", "A1: SFT on the labels", group="r_unlabelled", data=("labels",)),
        Row("sft_pseudo", "sft", "A2: SFT on labels + teacher labels (sequence-level KD)", group="r_unlabelled",
            data=pool),
        Row("final_kd_t1", "distill", "A3: final-layer KD (T=1) + SFT", _merge(final_kd, {"loss": {
            "temperature": 1.0}}), group="r_unlabelled", data=pool),
        Row("final_kd_t2", "distill", "A3b: final-layer KD (T=2) + SFT", _merge(final_kd, {"loss": {
            "temperature": 2.0}}), group="r_unlabelled", data=pool),
        Row("vlsi_pool", "distill", "A4: VLsI (full) + SFT", group="r_unlabelled", data=pool),
        Row("vlsi_plain", "distill", "A5: VLsI, plain verbalizer (residual: false)",
            {"verbalizers": {"residual": False}}, group="r_unlabelled", data=pool),
        Row("oracle", "sft", "O: SFT on labels + the pool's true labels", group="r_unlabelled",
            data=("labels", "true")),
        # R-few: the labelled frames only (A1 is sft_labels above, the same run); the teacher's soft
        # targets and layers on those frames alone
        Row("final_kd_few", "distill", "R-few A3: final-layer KD (T=1) + SFT, labelled frames only",
            _merge(final_kd, {"loss": {"temperature": 1.0}}), group="r_few", data=("labels",)),
        Row("vlsi_few", "distill", "R-few A4: VLsI (full) + SFT, labelled frames only", group="r_few",
            data=("labels",)),
    ]
    return rows


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    return _deep_update(base, changes)


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _deep_update(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_smoke_inputs(root: Path) -> dict[str, Any]:
    """Tiny teacher/student models and data for --smoke: the pipeline wiring, not the claims."""
    from vlsi_model.data.question_families import corpus_texts
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen2vl_config
    from vlsi_model.tokenizer import train_bpe_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(corpus_texts(30, seed=0), vocab_size=320)
    proc = make_image_processor(min_pixels=56 * 56, max_pixels=56 * 56)
    paths: dict[str, Any] = {}
    for name, kw, seed in (("teacher", {"hidden_size": 64, "num_layers": 4}, 1),
                           ("student", {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                        "vision_embed_dim": 32, "vision_heads": 2}, 2)):
        dest = root / name
        if not (dest / "config.json").is_file():
            save_model_dir(build_model(tiny_qwen2vl_config(tokenizer=tok, **kw), seed=seed), tok, proc, dest,
                           overwrite=True, metadata={"placeholder": False, "smoke": True})
        paths[name] = dest
    cfg = SceneConfig(width=56, height=56, max_objects=3)
    train = root / "data" / "train.json"
    if not train.is_file():
        write_dataset(root / "data", 6, seed=0, config=cfg, families=("caption", "count", "exist"))
    test = root / "data" / "test.json"
    if not test.is_file():
        write_dataset(root / "data", 3, seed=0, split="test", config=cfg, families=("count", "exist"))
    paths.update(train=train, test=test)
    return paths


def make_student_init(out: Path, teacher_dir: Path, seed: int) -> Path:
    """A freshly initialised nano student (seed `seed`) sharing the teacher's tokenizer and image processor."""
    from vlsi_model.checkpoint import load_image_processor, load_tokenizer
    from vlsi_model.models import build_model, save_model_dir
    from vlsi_model.nano import nano_student_config

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(teacher_dir)
    model = build_model(nano_student_config(tok), seed=seed)
    return save_model_dir(model, tok, load_image_processor(teacher_dir), out, overwrite=True,
                          metadata={"placeholder": False, "study_init_seed": seed})


# ---------------------------------------------------------------------------------------------
# Running rows
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyArgs:
    out: Path
    teacher: Path
    train_data: Path
    test_data: Path
    student_init: str  # "random" or a model directory
    seeds: list[int]
    budget: int
    interact_fraction: float
    verbalize_steps: int
    batch_size: int
    lr: float
    max_length: int
    eval_samples: int | None
    student_targets: dict[str, Any]
    teacher_targets: dict[str, Any]
    lora: dict[str, Any]
    freeze_vision: bool = True  # every row keeps the student's vision encoder as its recipe did
    interact_trains: str = "decoder"  # step 2: "decoder" or "language_model" (distill ModelRef.interact_trains)
    # Further test sets, by name: every row is also scored on each (first eval_samples records), a
    # column of the table each; e.g. a split of one question family the main test split holds few of.
    extra_tests: dict[str, Path] = field(default_factory=dict)
    # Named training files rows combine (Row.data), e.g. labels / teacher / true for R-unlabelled.
    sources: dict[str, Path] = field(default_factory=dict)
    # Finished (row, seed) results are also copied here (small JSON, committable) and count as
    # finished from here: a study spread over several machines or sessions keeps its rows.
    archive: Path | None = None
    # R-open (preregistration amendment 2): answers with many valid forms; content match is every
    # table's figure, exact match is kept beside it in each result ("exact").
    open_forms: bool = False
    # Answer tokens decoded per test question: 16 holds every one-form answer (at most 10 tokens);
    # open-form captions reach 55 (preregistration amendment 4: R-open evaluates with 64).
    max_new_tokens: int = 16


def row_train_data(row: Row, a: StudyArgs) -> str | list[dict[str, Any]]:
    """The `data.train` of a row: --train-data, one named source, or several concatenated (each
    weighted by its record count, so every record appears once per epoch)."""
    if not row.data:
        return str(a.train_data)
    missing = [name for name in row.data if name not in a.sources]
    if missing:
        raise ValueError(f"row {row.name} trains on {', '.join(missing)}: give --source NAME=FILE")
    if len(row.data) == 1:
        return str(a.sources[row.data[0]])
    return [{"path": str(a.sources[name]), "name": name, "weight": float(_record_count(a.sources[name]))}
            for name in row.data]


def _record_count(path: Path) -> int:
    from vlsi_model.data.llava import read_records

    return len(read_records(Path(path)))


def verbalize_data(a: StudyArgs) -> str | list[dict[str, Any]]:
    """What the shared step 1 trains the verb-FFNs on: the teacher-labelled mix when the study has
    one (every distill row of R-unlabelled trains on it), else --train-data."""
    if {"labels", "teacher"} <= set(a.sources):
        return row_train_data(Row("verbalize", "distill", "", data=("labels", "teacher")), a)
    return str(a.train_data)


def _student_init(a: StudyArgs, seed: int) -> Path:
    if a.student_init != "random":
        return Path(a.student_init)
    return make_student_init(a.out / "shared" / f"seed{seed}" / "student_init", a.teacher, seed)


def default_interact_trains(student_init: str) -> str:
    """What step 2 trains when --interact-trains is not given: the paper's decoder layers for a
    pretrained student; the whole language model for a random one, whose embeddings and LM head
    would otherwise stay random through step 2 while the SFT row trains them from its first step."""
    return "language_model" if student_init == "random" else "decoder"


def base_distill_config(a: StudyArgs, seed: int, output_dir: Path, interact_steps: int, sft_steps: int,
                        train: str | list[dict[str, Any]] | None = None) -> dict:
    """The distill config every row starts from (the full method), as `vlsi distill` reads it."""
    return {
        "output_dir": str(output_dir),
        "teacher": {"path": str(a.teacher)},
        "student": {"path": str(_student_init(a, seed)), "freeze_vision": a.freeze_vision,
                    "interact_trains": a.interact_trains},
        "data": {"train": train if train is not None else str(a.train_data), "max_length": a.max_length},
        "verbalizers": {"student": dict(a.student_targets), "teacher": dict(a.teacher_targets)},
        "matching": {"variant": "full", "seed": seed},
        "loss": {"intermediate_op": "kld", "last_op": "kld"},
        "lora": copy.deepcopy(a.lora),
        # cached_teacher row: a cache of the samples step 2 draws, built in training-size batches
        "teacher_cache": {"enabled": False, "batch_size": a.batch_size, "coverage": "run"},
        "train": {"per_device_batch_size": a.batch_size, "lr": a.lr, "seed": seed,
                  "warmup_steps": max(1, min(50, a.budget // 20)), "save_every_steps": max(1, a.budget // 4),
                  "log_every_steps": max(1, min(25, a.budget // 10))},
        "steps": {"verbalize": {"max_steps": a.verbalize_steps},
                  "interact": {"max_steps": max(1, interact_steps)},
                  "sft": {"max_steps": max(1, sft_steps)}},
    }


def _evaluate(model_dir: Path, a: StudyArgs, dest: Path, test_data: Path | None = None) -> dict[str, Any]:
    from vlsi_model.engine import load_engine
    from vlsi_model.evaluation import evaluate, write_results

    engine = load_engine(model_dir, "torch", device=_device())
    try:
        results = evaluate(model_dir, test_data or a.test_data, max_samples=a.eval_samples, engine=engine,
                           open_forms=a.open_forms, max_new_tokens=a.max_new_tokens)
    finally:
        engine.close()
    if a.open_forms:
        results = content_as_primary(results)
    write_results(results, dest)
    return results


def content_as_primary(results: dict[str, Any]) -> dict[str, Any]:
    """`vlsi eval --open-forms` results with content match as "overall" and per-family "accuracy"
    (what every table, comparison and log line of the study reads); the exact-match figures move to
    "exact" so nothing is lost."""
    content = results["content"]
    # priors, majority answers and top predictions on canonical forms too ("red" = "crimson")
    families = {name: {**f, **content["family_details"][name], "exact_accuracy": f["accuracy"]}
                for name, f in results["families"].items()}
    overall = {"accuracy": content["accuracy"], "n": content["n"], "correct": content["correct"],
               "list_set_f1": content["list_set_f1"]}
    exact = {"overall": results["overall"], "families": results["families"],
             "question_types": results.get("question_types", {})}
    return {**results, "overall": overall, "families": families, "question_types": content["question_types"],
            "exact": exact, "primary": "content match"}


def _add_extra_tests(model_dir: Path, a: StudyArgs, row_dir: Path, results: dict[str, Any]) -> bool:
    """Score `model_dir` on every extra test set `results` lacks, into results["extra"][name]
    (overall and per-family accuracy); returns whether anything was added.

    Why also for finished rows: a test set added after a study ran is scored from the models the
    rows kept, without retraining them."""
    extra = results.setdefault("extra", {})
    missing = [name for name in a.extra_tests if name not in extra]
    if missing and not (model_dir / "config.json").is_file():
        log.warning("%s: its model %s is gone; extra tests %s left out", row_dir, model_dir, missing)
        return False
    for name in missing:
        r = _evaluate(model_dir, a, row_dir / ".extra_tmp.json", a.extra_tests[name])
        extra[name] = {"overall": r["overall"], "families": r["families"], "data": str(a.extra_tests[name])}
        (row_dir / ".extra_tmp.json").unlink(missing_ok=True)
    return bool(missing)


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (created); yields whether this process holds it.

    flock rather than a marker file: the kernel drops the lock when its process dies, so a killed
    worker never leaves a (row, seed) claimed and its resume is not blocked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shared_verbalize(a: StudyArgs, seed: int) -> Path:
    """Step 1 for one seed (identical for every row): out/shared/seed<k>/distill.

    Parallel workers wait on one lock here, so the step runs once and the others reuse it.
    """
    from vlsi_model.distill.pipeline import run_distill
    out = a.out / "shared" / f"seed{seed}" / "distill"
    interact = round(a.budget * a.interact_fraction)
    cfg = base_distill_config(a, seed, out, interact, a.budget - interact, verbalize_data(a))
    with file_lock(out.parent / ".verbalize.lock"):
        run_distill(cfg, steps=["verbalize"], resume=True)
    return out


def seed_independent(row: Row, a: StudyArgs) -> bool:
    """Rows evaluated once for all seeds: the teacher, and a given (not random) student init."""
    return row.kind == "teacher" or (row.kind == "init" and a.student_init != "random")


def _row_dir(row: Row, a: StudyArgs, seed: int) -> Path:
    return a.out / "rows" / row.name / ("all" if seed_independent(row, a) else f"seed{seed}")


def _archived(row: Row, a: StudyArgs, seed: int) -> Path | None:
    if a.archive is None:
        return None
    return a.archive / row.name / ("all.json" if seed_independent(row, a) else f"seed{seed}.json")


def _scored_alike(result: dict[str, Any], a: StudyArgs, source: Path) -> dict[str, Any]:
    """`result`, unless it was scored otherwise than this study scores (content match with
    --open-forms, exact match without): ValueError rather than one table mixing the two."""
    if (result.get("primary") == "content match") != a.open_forms:
        scored = "content match" if result.get("primary") == "content match" else "exact match"
        raise ValueError(f"{source} was scored by {scored}, this study by "
                         f"{'content match (--open-forms)' if a.open_forms else 'exact match'}: give it its own "
                         "--out and --archive, or run it the way it was run")
    return result


def archived_result_files(archive: Path) -> list[tuple[str, int, Path]]:
    """Every (row, seed) result kept in `archive` (the files `_archived` names), sorted, as (row,
    seed, path); a row evaluated once (`all.json`) has seed 0. Matching statistics are not results."""
    found = []
    for path in sorted(archive.glob("*/*.json")):
        name = re.fullmatch(r"seed(\d+)\.json|all\.json", path.name)
        if name is not None:
            found.append((path.parent.name, int(name[1] or 0), path))
    return found


def finished_result(row: Row, a: StudyArgs, seed: int) -> dict[str, Any] | None:
    """The eval results of a finished (row, seed) (its run folder, or the archive), or None."""
    for result_file in (_row_dir(row, a, seed) / "eval.json", _archived(row, a, seed)):
        if result_file is not None and result_file.is_file():
            return _scored_alike(json.loads(result_file.read_text()), a, result_file)
    return None


def run_row(row: Row, a: StudyArgs, seed: int) -> dict[str, Any] | None:
    """Train (or resume) and evaluate one (row, seed); returns its eval results (cached on disk)."""
    from vlsi_model.distill.config import STUDENT_VERBALIZED_DIR, TEACHER_VERBALIZERS_DIR
    from vlsi_model.distill.pipeline import run_distill
    from vlsi_model.training.sft import run_sft

    row_dir = _row_dir(row, a, seed)
    result_file = row_dir / "eval.json"
    archived = _archived(row, a, seed)
    if not result_file.is_file() and archived is not None and archived.is_file():
        return _scored_alike(json.loads(archived.read_text()), a, archived)  # finished elsewhere
    if result_file.is_file():
        results = _scored_alike(json.loads(result_file.read_text()), a, result_file)
        if _add_extra_tests(row_model_dir(row, a, seed), a, row_dir, results):
            _write_json_atomic(result_file, results)
            if archived is not None:  # the archive keeps the new scores too
                archived.parent.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(archived, {**results, "seed": seed, "row": row.name})
        archive_matching_stats(row, a, seed)  # (a run killed between archiving its result and these)
        return results
    row_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if row.kind == "sft":  # (teacher and init rows train nothing: they are evaluated as they are)
        cfg = {"model": {"path": str(_student_init(a, seed)), "freeze_vision": a.freeze_vision},
               "data": {"train": row_train_data(row, a), "max_length": a.max_length},
               "train": {"output_dir": str(row_dir / "sft"), "max_steps": a.budget, "per_device_batch_size":
                         a.batch_size, "lr": a.lr, "seed": seed, "warmup_steps": max(1, min(50, a.budget // 20)),
                         "save_every_steps": max(1, a.budget // 4), "log_every_steps": max(1, min(25, a.budget // 10))}}
        run_sft(cfg, resume=True)
    elif row.kind == "distill":
        interact = a.budget if "sft" not in row.steps else round(a.budget * a.interact_fraction)
        cfg = _deep_update(base_distill_config(a, seed, row_dir / "distill", interact, a.budget - interact,
                                               row_train_data(row, a)), row.overrides)
        shared = _shared_verbalize(a, seed)
        for name in (TEACHER_VERBALIZERS_DIR, STUDENT_VERBALIZED_DIR):
            if not (row_dir / "distill" / name).is_dir():
                shutil.copytree(shared / name, row_dir / "distill" / name)
        run_distill(cfg, steps=list(row.steps), resume=True)
    train_s = time.perf_counter() - t0
    model_dir = row_model_dir(row, a, seed)
    results = _evaluate(model_dir, a, row_dir / ".eval_tmp.json")
    results["train_seconds"] = train_s
    # Keep only the answers, in test-file order: what the teacher-error analysis compares, small
    # enough to archive (the questions and references are in the test file).
    results["answers"] = [p["prediction"] for p in results.pop("predictions", [])]
    _add_extra_tests(model_dir, a, row_dir, results)
    _write_json_atomic(result_file, results)  # written last: its presence marks the row done
    (row_dir / ".eval_tmp.json").unlink(missing_ok=True)
    if archived is not None:
        archive_matching_stats(row, a, seed)  # first: an archived result implies its statistics are kept
        archived.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(archived, {**results, "seed": seed, "row": row.name})
    return results


def archive_matching_stats(row: Row, a: StudyArgs, seed: int) -> Path | None:
    """Keep a VLsI row's matching statistics beside its archived result
    (`<archive>/<row>/matching_stats_seed<N>.json`): H3 is judged from them, and the run folder
    holding the original does not outlive the machine. Rows without intermediate losses (final-layer
    KD) record matches too, but nothing trains on them: those are not kept."""
    from vlsi_model.distill.config import INTERACTION_DIR

    source = _row_dir(row, a, seed) / "distill" / INTERACTION_DIR / "matching_stats.json"
    layer_wise = row.overrides.get("loss", {}).get("intermediate_weight", 1.0) != 0
    if a.archive is None or row.kind != "distill" or not layer_wise or not source.is_file():
        return None
    dest = a.archive / row.name / f"matching_stats_seed{seed}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(dest, json.loads(source.read_text()))
    return dest


def row_model_dir(row: Row, a: StudyArgs, seed: int) -> Path:
    """Where a (row, seed)'s model is once trained: the one that row's results describe."""
    from vlsi_model.distill.config import FINAL_DIR, INTERACTION_DIR
    if row.kind == "teacher":
        return a.teacher
    if row.kind == "init":
        return _student_init(a, seed)
    row_dir = _row_dir(row, a, seed)
    if row.kind == "sft":
        return row_dir / "sft" / "final"
    return row_dir / "distill" / (FINAL_DIR if "sft" in row.steps else INTERACTION_DIR)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> str:
    """'mean ± std' of a table cell; one value alone; '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


PAIRED_REFERENCE = "vlsi_full"


def paired_delta(rs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> list[float]:
    """Overall accuracy minus the reference row's, seed by seed (only seeds both rows have).

    Why paired: rows of one seed share the verbalizers, the data order and the matching seed, so
    the per-seed difference removes most of the seed-to-seed spread that hides small effects.
    """
    ref = {r["seed"]: r["overall"]["accuracy"] for r in reference if "seed" in r}
    return [r["overall"]["accuracy"] - ref[r["seed"]] for r in rs if r.get("seed") in ref]


def constant_templates(result: dict[str, Any]) -> int | None:
    """How many question templates the model answers with one answer for every question.

    Why: on these scenes a constant answer flipped to the majority one moves a family's accuracy
    by 0.05-0.10 without anything learned, so an overall gain means little unless this stays put.
    """
    types = result.get("question_types")
    if not types:
        return None
    return sum(1 for v in types.values()
               if v.get("n", 0) > 1 and v.get("top_predictions") and v["top_predictions"][0][1] == v["n"])


# t(0.975, df) for the 95% interval of a paired mean difference over n = df + 1 seeds.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}

# The pre-registered comparisons (docs/study/preregistration.md): (better, worse, threshold, hypothesis,
# seeds). A verdict is given at the pre-registered number of paired seeds (5 for the arms, 2 for the
# oracle), not before: with 2 seeds t(0.975, 1) = 12.7 and "did not hold" would only say "too few".
PREREGISTERED = (("sft_pseudo", "sft_labels", 0.05, "H1", 5), ("final_kd_t1", "sft_labels", 0.05, "H1", 5),
                 ("vlsi_pool", "sft_labels", 0.05, "H1", 5), ("vlsi_pool", "sft_pseudo", 0.01, "H2", 5),
                 ("vlsi_pool", "final_kd_t1", 0.01, "H2", 5), ("oracle", "sft_labels", 0.10, "data-limited (test)", 2))
# Pre-registered extension: an H2 difference under this (absolute, at 5 seeds) gets 3 more seeds.
EXTEND_BELOW = 0.02


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of the 95% t-interval of paired differences; None under 2 pairs."""
    n = len(differences)
    if n < 2:
        return None
    mean = statistics.mean(differences)
    half = _T975.get(n - 1, 1.96) * statistics.stdev(differences) / n ** 0.5
    return mean, mean - half, mean + half


def matching_order_preserving(stats: dict[str, Any]) -> bool:
    """H3 (pre-registered) for one run's matching statistics: for every student target s < s', the
    modal matched teacher target of s is not deeper than that of s', early and late in step 2."""
    for phase in ("early", "late"):
        modal = [max(range(len(row)), key=row.__getitem__) for row in stats[phase]["frequency"]]
        if any(a > b for a, b in itertools.pairwise(modal)):
            return False
    return True


def preregistered_comparisons(results: dict[str, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """The pre-registered paired comparisons among the rows present: markdown lines + JSON."""
    lines, out = [], []
    for better, worse, threshold, hypothesis, planned in PREREGISTERED:
        if better not in results or worse not in results:
            continue
        deltas = paired_delta(results[better], results[worse])
        ci = paired_interval(deltas)
        mean = statistics.mean(deltas) if deltas else float("nan")
        held = ci is not None and mean >= threshold and ci[1] > 0
        interval = f"[{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else "(one pair: no interval)"
        if len(deltas) < planned:
            interim = ("so far above the threshold" if held else "so far not above it") if ci else "no interval yet"
            verdict = f"open ({len(deltas)} of {planned} seeds; {interim})"
        elif hypothesis == "H2" and len(deltas) == planned and abs(mean) < EXTEND_BELOW:
            verdict = f"open (|difference| < {EXTEND_BELOW}: 3 more seeds pre-registered)"
        else:
            verdict = "held" if held else "did not hold"
        lines.append(f"| {hypothesis} | {better} - {worse} | {len(deltas)} | {mean:+.3f} | {interval} | "
                     f">= {threshold:.2f}, interval above 0 | {verdict} |")
        out.append({"hypothesis": hypothesis, "better": better, "worse": worse, "pairs": len(deltas),
                    "differences": deltas, "mean": mean, "ci95": list(ci[1:]) if ci else None,
                    "threshold": threshold, "verdict": verdict})
    if not lines:
        return "", out
    header = ["| hypothesis | comparison | pairs | mean | 95% interval | threshold | verdict |",
              "|---|---|---:|---:|---|---|---|"]
    return "\n".join(header + lines), out


def teacher_error_copying(results: dict[str, list[dict[str, Any]]], test_data: Path,
                          open_forms: bool = False) -> tuple[str, dict[str, Any]]:
    """Per family: on the test questions the teacher answers wrongly, the share of each row's answers
    that repeat the teacher's wrong answer (pre-registered: a student taught by the teacher's labels
    may inherit its mistakes). Rows need their `answers` (test-file order). `open_forms`: answers
    are compared by content (`canonical_match`), so a copied error in other words still counts."""
    from vlsi_model.answers import exact_match
    from vlsi_model.data.open_answers import canonical_match
    from vlsi_model.evaluation import load_eval_samples

    def same(prediction: str, reference: str, family: str) -> bool:
        return canonical_match(prediction, reference, family) if open_forms else exact_match(prediction, reference)

    teacher = next((r for r in results.get("teacher", []) if r.get("answers")), None)
    if teacher is None:
        return "", {}
    samples = load_eval_samples(test_data)
    wrong = [i for i, s in enumerate(samples) if not same(teacher["answers"][i], s.reference, s.family)]
    families = sorted({samples[i].family for i in wrong})
    out: dict[str, Any] = {}
    for name, rs in results.items():
        if name == "teacher":
            continue
        runs = [r for r in rs if len(r.get("answers", [])) == len(samples)]
        if not runs:
            continue
        out[name] = {f: statistics.mean(
            sum(same(r["answers"][i], teacher["answers"][i], f) for i in wrong if samples[i].family == f)
            / max(1, sum(1 for i in wrong if samples[i].family == f)) for r in runs) for f in families}
        out[name]["all"] = statistics.mean(sum(same(r["answers"][i], teacher["answers"][i], samples[i].family)
                                               for i in wrong)
                                           / max(1, len(wrong)) for r in runs)
        out[name]["seeds"] = len(runs)
    if not out:
        return "", {}
    counts = {f: sum(1 for i in wrong if samples[i].family == f) for f in families}
    header = " | ".join(f"{f} ({counts[f]})" for f in families)
    lines = [f"| row | seeds | all ({len(wrong)}) | {header} |", "|---|---:|---:|" + "---:|" * len(families)]
    for name, v in out.items():
        lines.append(f"| {name} | {v['seeds']} | {v['all']:.3f} | " + " | ".join(f"{v[f]:.3f}" for f in families)
                     + " |")
    return "\n".join(lines), out


def summarise(rows: Sequence[Row], results: dict[str, list[dict[str, Any]]],
              reference_row: str = PAIRED_REFERENCE) -> tuple[str, dict[str, Any]]:
    """Markdown table (mean ± std over seeds; the paired difference to the reference row; templates
    answered with a constant; the student's training minutes) and the same numbers as JSON."""
    families = sorted({f for rs in results.values() for r in rs for f in r["families"]})
    extras = list(dict.fromkeys(name for rs in results.values() for r in rs for name in r.get("extra", {})))
    # R-open's second pre-registered metric: set-F1 of list answers (captions), scored with content match
    set_f1 = any("list_set_f1" in r["overall"] for rs in results.values() for r in rs)
    columns = (["lists set-F1"] if set_f1 else []) + families + [f"{name} (set)" for name in extras]
    reference = results.get(reference_row, [])
    header = ("| row | seeds | overall | " + " | ".join(columns)
              + f" | overall - {reference_row} (paired) | constant templates | train min |")
    lines = [header, "|" + "---|" * (6 + len(columns))]
    summary: dict[str, Any] = {}
    group = None
    for row in rows:
        rs = results.get(row.name, [])
        if row.group != group:
            group = row.group
            if group != "main":
                lines.append(f"| *{group}* |" + " |" * (5 + len(columns)))
        overall = [r["overall"]["accuracy"] for r in rs]
        per_family = {f: [r["families"][f]["accuracy"] for r in rs if f in r["families"]] for f in families}
        per_extra = {name: [r["extra"][name]["overall"]["accuracy"] for r in rs if name in r.get("extra", {})]
                     for name in extras}
        paired = paired_delta(rs, reference) if row.kind in ("sft", "distill") and row.name != reference_row \
            else []
        minutes = [r["train_seconds"] / 60 for r in rs if row.kind in ("sft", "distill") and "train_seconds" in r]
        delta_cell = ""
        if paired:
            delta_cell = f"{statistics.mean(paired):+.3f}"
            delta_cell += f" ± {statistics.stdev(paired):.3f}" if len(paired) > 1 else ""
            delta_cell += f" (n={len(paired)})"
        constants = [c for c in (constant_templates(r) for r in rs) if c is not None]
        constant_cell = f"{statistics.mean(constants):.1f}" if constants else ""
        f1 = [r["overall"]["list_set_f1"] for r in rs if "list_set_f1" in r["overall"]]
        cells = ([mean_std(f1)] if set_f1 else []) + [mean_std(per_family[f]) for f in families] + \
            [mean_std(per_extra[n]) for n in extras]
        lines.append(f"| {row.label} | {len(rs)} | {mean_std(overall)} | " + " | ".join(cells)
                     + f" | {delta_cell} | {constant_cell} | {f'{statistics.mean(minutes):.1f}' if minutes else ''} |")
        summary[row.name] = {
            "label": row.label, "seeds": len(rs), "overall": overall,
            "overall_mean": statistics.mean(overall) if overall else None,
            "overall_std": statistics.stdev(overall) if len(overall) > 1 else 0.0,
            "families": {f: v for f, v in per_family.items()},
            **({"list_set_f1": f1} if set_f1 else {}),
            "extra_tests": per_extra,
            "seed_list": [r.get("seed") for r in rs],
            f"paired_delta_vs_{reference_row}": paired,
            "train_minutes": minutes,
            "constant_templates": constants,
        }
    priors = {}
    for rs in results.values():
        for r in rs:
            for f, v in r["families"].items():
                priors.setdefault(f, v["prior"])
            for name, v in r.get("extra", {}).items():
                if len(v["families"]) == 1:  # one family: its majority answer is the set's prior
                    priors.setdefault(f"{name} (set)", next(iter(v["families"].values()))["prior"])
    if priors:
        cells = " | ".join(f"{priors[c]:.3f}" if c in priors else "" for c in columns)
        lines.append(f"| *answer prior (majority)* | | | {cells} | | | |")
    return "\n".join(lines), summary


def plot_matching(a: StudyArgs, rows: Sequence[Row], seed: int) -> Path | None:
    """Copy the full method's heatmap and draw every matching variant's late-training frequencies."""
    from matplotlib.figure import Figure

    from vlsi_model.distill.config import INTERACTION_DIR
    stats = {}
    for row in rows:
        if row.name in ("vlsi_full", "vlsi_pool") or row.name.startswith("match_"):
            path = a.out / "rows" / row.name / f"seed{seed}" / "distill" / INTERACTION_DIR / "matching_stats.json"
            if path.is_file():
                stats[row.name] = json.loads(path.read_text())
    for full in ("vlsi_pool", "vlsi_full"):
        full_png = a.out / "rows" / full / f"seed{seed}" / "distill" / INTERACTION_DIR / "matching_heatmap.png"
        if full_png.is_file():
            shutil.copyfile(full_png, a.out / "matching_heatmap.png")
            break
    if not stats:
        return None
    fig = Figure(figsize=(3.2 * len(stats), 3.0), layout="constrained")
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    image = None
    for ax, (name, st) in zip(axes, stats.items(), strict=True):
        image = ax.imshow(st["overall"]["frequency"], vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(name.replace("match_", ""), fontsize=9)
        ax.set_xticks(range(len(st["teacher_layers"])), [str(x) for x in st["teacher_layers"]], fontsize=7)
        ax.set_yticks(range(len(st["student_layers"])), [str(x) for x in st["student_layers"]], fontsize=7)
        ax.set_xlabel("teacher layer", fontsize=8)
    axes[0].set_ylabel("student layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="match frequency (whole run)")
    out = a.out / "matching_variants.png"
    fig.savefig(out, dpi=100)
    return out


def _targets(p: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """'stride:start' -> {stride, start}; '0,1,2,3' -> {layers: [...]} (the distill config's forms)."""
    try:
        if ":" in text:
            stride, start = (int(v) for v in text.split(":"))
            return {"stride": stride, "start": start}
        return {"layers": [int(v) for v in text.split(",") if v.strip()]}
    except ValueError:
        p.error(f"layer targets: expected 'stride:start' or a list like '1,2,3', got {text!r}")
        raise  # unreachable: p.error exits


def _parse_extra_tests(p: argparse.ArgumentParser, specs: Sequence[str], option: str = "--extra-test"
                       ) -> dict[str, Path]:
    extra: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip() or "|" in name:
            p.error(f"{option} wants NAME=FILE, got {spec!r}")
        if name.strip() in extra:
            p.error(f"{option} {name.strip()!r} given twice")
        extra[name.strip()] = Path(path.strip())
    return extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/vlsi_study"))
    p.add_argument("--teacher", type=Path, default=Path("runs/nano/teacher/final"))
    p.add_argument("--train-data", type=Path, default=Path("runs/nano/data/train_mix.json"))
    p.add_argument("--test-data", type=Path, default=Path("runs/nano/test/test.json"))
    p.add_argument("--student-init", default="random", help="'random' (a fresh nano student per seed) or a model dir")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=2000, help="student optimizer steps per row")
    p.add_argument("--interact-fraction", type=float, default=0.5, help="share of the budget spent in step 2")
    p.add_argument("--verbalize-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=None, help="first N test records (default: all)")
    p.add_argument("--extra-test", action="append", default=[], metavar="NAME=FILE",
                   help="also score every row on this test set (a table column NAME); repeatable; finished rows "
                        "are scored from the models they kept")
    p.add_argument("--source", action="append", default=[], metavar="NAME=FILE",
                   help="a named training file rows combine (R-unlabelled: labels, teacher, true); repeatable")
    p.add_argument("--archive", type=Path, default=None,
                   help="also keep each finished (row, seed) result here (small JSON to commit); results found "
                        "here count as finished")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--student-targets", default=None, metavar="LAYERS",
                   help="the student's verbalized layers: 'stride:start' or a list '1,2,3' (default 1:1, "
                        "layers 1-3 of the 4-layer nano student)")
    p.add_argument("--teacher-targets", default=None, metavar="LAYERS",
                   help="the teacher's verbalized layers, as --student-targets (default 2:1: layers 1, 3, 5, 7 of an "
                        "8-layer teacher; give '0,1,2,3' for a 4-layer one)")
    p.add_argument("--paired-reference", default=None,
                   help="row the table's paired column subtracts (default vlsi_pool when present, else vlsi_full)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-vision", action="store_true",
                   help="let SFT (the SFT row, step 3) train the student's vision encoder; default: it stays as the "
                        "nano recipe left it (frozen random), because a trained merger erodes the shape information")
    p.add_argument("--interact-trains", choices=("decoder", "language_model"), default=None,
                   help="what step 2 trains: the decoder layers (default for a pretrained --student-init) or the "
                        "whole language model with embeddings and LM head (default for --student-init random)")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="answer tokens decoded per test question (R-open: 64, its captions reach 55)")
    p.add_argument("--open-forms", action="store_true",
                   help="R-open: score content match (synonyms, list order, number words) as every figure")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table from the (row, seed) pairs already finished")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1-2 steps per row, 1 seed: wiring check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    student_targets = _targets(p, args.student_targets) if args.student_targets else NANO_STUDENT_TARGETS
    teacher_targets = _targets(p, args.teacher_targets) if args.teacher_targets else NANO_TEACHER_TARGETS
    lora = NANO_LORA
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.smoke:
        paths = build_smoke_inputs(args.out / "smoke_inputs")
        args.teacher, args.train_data, args.test_data = paths["teacher"], paths["train"], paths["test"]
        args.student_init = str(paths["student"])
        seeds, args.budget, args.verbalize_steps, args.batch_size = seeds[:1], 2, 1, 2
        student_targets, teacher_targets = {"stride": 1, "start": 0}, {"stride": 1, "start": 0}
        args.max_length = 64
        if not args.source:  # the R-unlabelled rows' sources: the smoke's one data file under three names
            args.source = [f"{name}={args.train_data}" for name in ("labels", "teacher", "true")]
    a = StudyArgs(args.out, args.teacher, args.train_data, args.test_data, args.student_init, seeds, args.budget,
                  args.interact_fraction, args.verbalize_steps, args.batch_size, args.lr, args.max_length,
                  args.eval_samples, student_targets, teacher_targets, lora, freeze_vision=not args.train_vision,
                  extra_tests=_parse_extra_tests(p, args.extra_test),
                  interact_trains=args.interact_trains or default_interact_trains(args.student_init),
                  sources=_parse_extra_tests(p, args.source, "--source"), archive=args.archive,
                  open_forms=args.open_forms, max_new_tokens=args.max_new_tokens)
    for path, what in ((a.teacher, "teacher model"), (a.test_data, "test data"),
                       *(((a.train_data, "train data"),) if not a.sources else ()),
                       *((path, f"extra test {name}") for name, path in a.extra_tests.items()),
                       *((path, f"source {name}") for name, path in a.sources.items())):
        if not Path(path).exists():
            p.error(f"{what} not found: {path}")
    rows = study_rows()
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        unknown = wanted - {r.name for r in rows}
        if unknown:
            p.error(f"unknown rows {sorted(unknown)}")
        rows = [r for r in rows if r.name in wanted]
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for seed in ([seeds[0]] if seed_independent(row, a) else seeds):
            try:
                if args.report_only:
                    r = finished_result(row, a, seed)
                else:
                    with file_lock(_row_dir(row, a, seed) / ".lock", blocking=False) as mine:
                        if mine:
                            log.info("row %s seed %d on %s", row.name, seed, _device())
                            r = run_row(row, a, seed)
                        else:
                            log.info("row %s seed %d: held by another process, skipped", row.name, seed)
                            r = finished_result(row, a, seed)
            except ValueError as exc:  # settings that do not fit the row or its earlier results
                p.error(f"row {row.name} seed {seed}: {exc}")
            if r is not None:
                results.setdefault(row.name, []).append({**r, "seed": seed})
                log.info("row %s seed %d: overall %.3f", row.name, seed, r["overall"]["accuracy"])
    reference = args.paired_reference or ("vlsi_pool" if "vlsi_pool" in results else PAIRED_REFERENCE)
    table, summary = summarise(rows, results, reference)
    comparisons, comparison_json = preregistered_comparisons(results)
    summary["preregistered_comparisons"] = comparison_json
    copying, copying_json = teacher_error_copying(results, a.test_data, a.open_forms)
    summary["teacher_error_copying"] = copying_json
    plot_matching(a, rows, seeds[0])
    text = (f"# VLsI study (nano family)\n\nbudget {a.budget} student steps per row, seeds {seeds}, "
            f"device {_device()}, step 2 trains the {a.interact_trains.replace('_', ' ')}, test {a.test_data}"
            + (", figures: content match (open-form answers; exact match in results.json)" if a.open_forms else "")
            + (f", up to {a.max_new_tokens} answer tokens" if a.max_new_tokens != 16 else "")
            + "".join(f", {name} (set): {path}" for name, path in a.extra_tests.items())
            + "".join(f", source {name}: {path}" for name, path in a.sources.items()) + f"\n\n{table}\n"
            + (f"\n## Pre-registered comparisons (docs/study/preregistration.md)\n\n{comparisons}\n"
               if comparisons else "")
            + ("\n## Copying the teacher's errors\n\nOn the test questions the teacher answers wrongly (count per "
               "family in brackets), the share of each row's answers equal to the teacher's wrong answer:\n\n"
               f"{copying}\n" if copying else ""))
    (a.out / "results.md").write_text(text)
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                    "rows": summary}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
