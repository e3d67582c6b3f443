"""The three VLsI steps end to end (`vlsi distill`): verbalize, interact, SFT.

Config (YAML; relative paths are relative to the current directory; see configs/distill_tiny.yaml):

    output_dir: runs/distill
    teacher: {path: runs/teacher/final, dtype: float32}   # HF model directories; dtype of the
    student: {path: runs/student/final, freeze_vision: false}   # freeze_vision: keep the vision encoder fixed in step 3
                                             # + interact_trains: decoder | language_model (see below)
    data: {train: data/train.json, max_length: 512, on_error: raise}   # LLaVA conversation JSON
    verbalizers:
      student: {stride: 4, start: 2}        # or {layers: [2, 6, 10]}: an explicit list wins
      teacher: {stride: 4, start: 2}
      residual: true                        # VerbFFN residual form (see verbalizer.py)
      chunk_tokens: 256                     # token chunk of the verbalization CE
    matching: {variant: full, scale: 2.0, eps: 1.0e-6, temperature: 1.0, seed: 0}   # matching.MatchConfig
    loss: {intermediate_op: kld, last_op: kld, direction: forward, temperature: 1.0, chunk_tokens: 256}
    lora: {enabled: true, r: 64, alpha: 64, dropout: 0.0, target_modules: [q_proj, ...], steps: [interact]}
    teacher_cache: {enabled: false, k: 64, dtype: float32, batch_size: 4, coverage: run}   # coverage: run =
                                             # only the samples step 2 draws; dataset = every sample
    train: {max_steps: 1000, per_device_batch_size: 8, lr: 1.0e-4, ...}   # TrainConfig, shared by all steps
    steps:                                   # per-step overrides of `train`
      verbalize: {max_steps: 200, lr: 1.0e-3}
      interact: {max_steps: 1000}
      sft: {max_steps: 1000}

Outputs under output_dir:
    teacher_verbalizers/   the teacher's trained verb-FFNs (verbalizers.safetensors + .json)
    student_verbalized/    the student (unchanged weights, HF layout) + verbalizers/ beside it
    interaction/           the student after step 2 (HF layout, LoRA merged) + verbalizers/ +
                           matching_stats.json + matching_heatmap.png (paper Fig. 5)
    final/                 the student after step 3: HF layout, no verbalizer weights anywhere
    teacher_cache/         the teacher's top-k distributions (only with teacher_cache.enabled)
    runs/<run>/            trainer state per run (verbalize_teacher, verbalize_student, interact,
                           sft): checkpoints/, metrics.jsonl, matches_rank<r>.jsonl
Every output directory is built beside its destination and renamed into place, so an
output that exists is complete: with `resume`, completed steps are skipped and an
interrupted one continues from its newest trainer checkpoint (exactly); without `resume`,
an existing output is an error rather than silently overwritten.

Choices the paper leaves open (ours, documented):
- Both models see the student's image processor: teacher and student must produce the
  same token sequence (same number of image tokens) for their per-token distributions to
  be compared position by position.
- LoRA goes on the decoder layers' linear layers only (`target_modules` names matched
  inside the decoder layers, never the vision tower, whose Qwen2.5-VL MLP uses the same
  names). By default only the interaction step uses LoRA (the paper's r = alpha = 64);
  `lora.steps: [interact, sft]` uses it for SFT too. Adapters are merged
  (`merge_and_unload`) before each step's output is written.
- Full fine-tuning (`lora.enabled: false`) in the interaction step trains the decoder
  layers (not the vision tower, embeddings, final norm or LM head: the verbalizers share
  the latter two; `student.interact_trains: language_model` trains those three too, for a
  student that starts from a random init); in the SFT step it trains every weight, like `vlsi train`, except the
  vision encoder with `student.freeze_vision: true` (for students trained on a frozen one).
- The verbalizers' initial weights (and LoRA's) are seeded by `train.seed`, so a run is
  reproducible and a resumed run equals an uninterrupted one.
- With several processes, each records its own matches (runs/interact/matches_rank<r>.jsonl);
  the statistics merge all of them. The teacher cache is built by the main process alone,
  on its device, before training starts (the others wait).
- DDP: with `loss.last_op: none`, decoder layers above the deepest student target get no
  gradient; set `train.find_unused_parameters: true` then.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlsi_model.distill.adapters import BackboneAdapter, get_adapter, unwrap_model
from vlsi_model.distill.losses import LossConfig
from vlsi_model.distill.matching import LayerMatcher, MatchConfig, MatchRecorder
from vlsi_model.distill.objectives import InteractionObjective, VerbalizationObjective
from vlsi_model.distill.verbalizer import (
    Verbalizers,
    load_verbalizers,
    read_verbalizer_meta,
    save_verbalizers,
    select_target_layers,
    verbalizer_dir,
)
from vlsi_model.fileio import replace_directory
from vlsi_model.training.config import (
    ConfigError,
    TrainConfig,
    dataclass_from_dict,
    dataclass_to_dict,
    load_yaml_config,
    save_yaml,
)
from vlsi_model.training.mixture import DataSource

log = logging.getLogger(__name__)

STEPS = ("verbalize", "interact", "sft")
TEACHER_VERBALIZERS_DIR = "teacher_verbalizers"
STUDENT_VERBALIZED_DIR = "student_verbalized"
INTERACTION_DIR = "interaction"
FINAL_DIR = "final"
TEACHER_CACHE_DIR = "teacher_cache"
RUNS_DIR = "runs"
CONFIG_COPY = "distill_config.yaml"
MATCHING_NAME = "matching"
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelRef:
    """A Hugging Face model directory and the dtype to hold its weights in."""

    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Student only: keep its vision encoder (merger included) fixed in the SFT step too, as
    # `vlsi train`'s model.freeze_vision does (step 2 never trains it). The teacher is always frozen.
    freeze_vision: bool = False
    # Student only: what step 2 trains without LoRA. "decoder" (the paper: the decoder layers; the
    # token embeddings, final norm and LM head stay as pretrained, and the verbalizers read through
    # them) or "language_model" (those too): for a student that starts untrained, whose random
    # embeddings and head would otherwise stay random through step 2 while SFT trains them.
    interact_trains: Literal["decoder", "language_model"] = "decoder"


@dataclass
class TargetSpec:
    """Target layers: an explicit `layers` list, or every `stride`-th layer from `start`."""

    layers: list[int] | None = None
    stride: int = 4
    start: int = 2


@dataclass
class VerbalizerSection:
    student: TargetSpec = field(default_factory=TargetSpec)
    teacher: TargetSpec = field(default_factory=TargetSpec)
    residual: bool = True
    chunk_tokens: int = 256


@dataclass
class DataSection:
    train: str | list[DataSource]  # one file, or weighted sources (training/mixture.py)
    max_length: int = 2048
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class LoraSection:
    enabled: bool = True
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    steps: list[str] = field(default_factory=lambda: ["interact"])

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError("lora.r must be >= 1 and lora.alpha > 0")
        bad = [s for s in self.steps if s not in ("interact", "sft")]
        if bad:
            raise ValueError(f"lora.steps may hold interact and sft, got {bad}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


@dataclass
class TeacherCacheSection:
    enabled: bool = False
    k: int = 64
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 4
    path: str | None = None  # default: <output_dir>/teacher_cache
    # "run": only the samples step 2 draws (max_steps x global batch; its seed and batch geometry
    # fix them in advance); "dataset": every sample, for a cache shared by runs that differ there.
    coverage: Literal["run", "dataset"] = "run"

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1:
            raise ValueError("teacher_cache.k and teacher_cache.batch_size must be >= 1")
        if self.coverage not in ("run", "dataset"):
            raise ValueError(f"teacher_cache.coverage must be 'run' or 'dataset', got {self.coverage!r}")


@dataclass
class DistillConfig:
    output_dir: str
    teacher: ModelRef
    student: ModelRef
    data: DataSection
    verbalizers: VerbalizerSection = field(default_factory=VerbalizerSection)
    matching: MatchConfig = field(default_factory=MatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    teacher_cache: TeacherCacheSection = field(default_factory=TeacherCacheSection)
    train: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "output_dir" in self.train:
            raise ValueError("train.output_dir is set per run under output_dir/runs/; remove it")
        if self.teacher.freeze_vision:
            raise ValueError("teacher.freeze_vision: the teacher never trains; freeze_vision is a student option")
        if self.teacher.interact_trains != "decoder":
            raise ValueError("teacher.interact_trains: the teacher never trains; interact_trains is a student option")
        if self.student.interact_trains != "decoder" and self.lora.enabled and "interact" in self.lora.steps:
            raise ValueError("student.interact_trains: language_model with LoRA in the interaction step: LoRA "
                             "trains only the decoder; drop one of the two")
        if self.student.freeze_vision and self.lora.enabled and "sft" in self.lora.steps:
            raise ValueError("student.freeze_vision with LoRA in the SFT step: LoRA already trains only the decoder; "
                             "drop one of the two")
        unknown = sorted(set(self.steps) - set(STEPS))
        if unknown:
            raise ValueError(f"steps: unknown step(s) {', '.join(unknown)} (valid: {', '.join(STEPS)})")
        for name in STEPS:  # fail now, not after hours of step 1
            self.train_config(name, "check")

    @property
    def out(self) -> Path:
        return Path(self.output_dir).expanduser()

    def train_config(self, step: str, run_name: str) -> TrainConfig:
        """The TrainConfig of one run of `step`: `train` + `steps.<step>` overrides, output in runs/<run_name>."""
        overrides = dict(self.steps.get(step) or {})
        if "output_dir" in overrides:
            raise ConfigError(f"steps.{step}.output_dir: the run directory is fixed (output_dir/runs/)")
        merged = {**self.train, **overrides, "output_dir": str(self.out / RUNS_DIR / run_name)}
        return TrainConfig.from_dict(merged, where=f"train + steps.{step}")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)


def load_distill_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> DistillConfig:
    """A DistillConfig from a YAML file or a mapping; ConfigError names any bad key.

    A mapping is deep-copied: the config must not change when the caller edits its dict later
    (the study builds one row's config from another's).
    """
    if isinstance(source, Mapping):
        return dataclass_from_dict(DistillConfig, copy.deepcopy(dict(source)), "config")
    return dataclass_from_dict(DistillConfig, load_yaml_config(source), str(source))


def parse_steps(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'verbalize,interact' -> ('verbalize', 'interact'), always in pipeline order."""
    if text is None:
        return STEPS
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in items if s not in STEPS]
    if bad or not items:
        raise ConfigError(f"--steps: expected a comma-separated subset of {','.join(STEPS)}, got {text!r}")
    return tuple(s for s in STEPS if s in items)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _state() -> Any:
    from vlsi_model.training.trainer import distributed_state

    return distributed_state()


def _publish(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build an output directory beside `dest` (main process only), then rename it into place."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    return replace_directory(partial, dest)


def _load(ref_path: str | Path, dtype: str = "float32", device: Any = "cpu") -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, image processor); the trainer moves models to the training device itself."""
    from vlsi_model.checkpoint import load_model_dir

    return load_model_dir(Path(ref_path).expanduser(), device=device, dtype=_DTYPES[dtype])


def load_config_vocab(model_dir: str | Path) -> int:
    """The padded vocabulary size in a model directory's config.json (without loading its weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(Path(model_dir).expanduser()), local_files_only=True,
                                        trust_remote_code=False)
    return int(config.get_text_config().vocab_size)


def _check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """VLsI compares distributions token by token: both models must use one vocabulary, in one order."""
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens, or another "
            "token order); VLsI needs one shared tokenizer"
        )


def _dataset(cfg: DistillConfig, tokenizer: Any, image_processor: Any) -> Any:
    from vlsi_model.training.mixture import data_summary, load_training_data

    d = cfg.data
    dataset = load_training_data(d.train, tokenizer, image_processor, d.max_length, d.on_error,
                                 seed=int(cfg.train.get("seed", 0)))
    log.info("training data: %s", data_summary(dataset, d.train))
    return dataset


def _targets(spec: TargetSpec, num_layers: int, who: str) -> list[int]:
    try:
        return select_target_layers(num_layers, spec.stride, spec.start, spec.layers)
    except ValueError as exc:
        raise ConfigError(f"verbalizers.{who}: {exc}") from exc


def _new_verbalizers(hidden: int, targets: list[int], residual: bool, seed: int) -> Verbalizers:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Verbalizers(hidden, targets, residual=residual)


def _decoder_module_names(model: nn.Module, adapter: BackboneAdapter, leaf_names: Sequence[str]) -> list[str]:
    """Full names of the modules called one of `leaf_names` inside the decoder layers (not the vision tower)."""
    layer_ids = {id(layer) for layer in adapter.decoder_layers(model)}
    names: list[str] = []
    prefixes: list[str] = [n for n, m in model.named_modules() if id(m) in layer_ids]
    wanted = set(leaf_names)
    for name, module in model.named_modules():
        inside = any(name.startswith(p + ".") for p in prefixes)
        if inside and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    return names


def _prepare_trainable(
    model: nn.Module, adapter: BackboneAdapter, lora: LoraSection, step: str, seed: int,
    interact_trains: str = "decoder",
) -> tuple[nn.Module, bool]:
    """(model to train, whether it is a PEFT model): LoRA on the decoder, or which weights train in full.

    Step 2 without LoRA trains the decoder layers, plus the token embeddings, final norm and LM
    head when `interact_trains` is "language_model" (`ModelRef.interact_trains`); step 3 trains
    everything (the caller freezes the vision encoder when asked).
    """
    if lora.enabled and step in lora.steps:
        from peft import LoraConfig, get_peft_model

        targets = _decoder_module_names(model, adapter, lora.target_modules)
        if not targets:
            raise ConfigError(f"lora.target_modules {lora.target_modules} match no linear layer in the decoder")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(
                model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
            )
        return peft_model, True
    if step == "interact":
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [adapter.decoder_layers(model)]
        if interact_trains == "language_model":
            trained += [unwrap_model(model).get_input_embeddings(), adapter.final_norm(model), adapter.lm_head(model)]
        for module in trained:
            for p in module.parameters():
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, False


def _merged(model: nn.Module, is_peft: bool) -> nn.Module:
    return model.merge_and_unload() if is_peft else model


def _free(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _done(path: Path) -> bool:
    return path.is_dir()


def _skip_or_refuse(dest: Path, resume: bool, step: str) -> bool:
    """True to skip a completed output; ConfigError for an existing output without resume."""
    if not _done(dest):
        return False
    if resume:
        log.info("%s: %s is complete, skipping", step, dest)
        return True
    raise ConfigError(
        f"{dest} already exists (step {step} is complete); pass --resume to skip completed steps, "
        "or remove it (or choose another output_dir) to redo it"
    )


def _require(path: Path, what: str, step: str) -> None:
    if not _done(path):
        raise ConfigError(f"step {step} needs {what} at {path}; run the earlier step(s) first (--steps)")


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _verbalize_one(
    cfg: DistillConfig, model: nn.Module, dataset: Any, pad_id: int, spec: TargetSpec, who: str, resume: bool,
    force_resume: bool,
) -> Verbalizers:
    from vlsi_model.training.data import make_collate_fn
    from vlsi_model.training.trainer import train

    adapter = get_adapter(model)
    targets = _targets(spec, adapter.num_layers(model), who)
    tc = cfg.train_config("verbalize", f"verbalize_{who}")
    verbs = _new_verbalizers(adapter.hidden_size(model), targets, cfg.verbalizers.residual, tc.seed)
    objective = VerbalizationObjective(model, verbs, adapter, chunk_tokens=cfg.verbalizers.chunk_tokens)
    result = train(objective, dataset, make_collate_fn(pad_id), tc, resume=resume, progress_desc=f"verbalize {who}",
                   force_resume=force_resume)
    log.info("verbalized %s layers %s: %d steps, final loss %.4f", who, targets, result.steps, result.final_loss)
    return verbs.eval()


def run_verbalize(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 1: train the teacher's and the student's verb-FFNs (backbones frozen), each on its own."""
    from vlsi_model.models import save_model_dir

    state = _state()
    out = cfg.out
    t_dest, s_dest = out / TEACHER_VERBALIZERS_DIR, out / STUDENT_VERBALIZED_DIR
    if _done(t_dest) and _done(s_dest) and resume:
        log.info("verbalize: %s and %s are complete, skipping", t_dest, s_dest)
        return
    student, tokenizer, image_processor = _load(cfg.student.path, cfg.student.dtype)
    dataset = _dataset(cfg, tokenizer, image_processor)
    pad_id = int(tokenizer.pad_token_id)
    if not _skip_or_refuse(t_dest, resume, "verbalize (teacher)"):
        teacher, t_tokenizer, _ = _load(cfg.teacher.path, cfg.teacher.dtype)
        _check_same_tokenizer(t_tokenizer, tokenizer)
        verbs = _verbalize_one(cfg, teacher, dataset, pad_id, cfg.verbalizers.teacher, "teacher", resume,
                               force_resume)
        model_type = get_adapter(teacher).model_type
        if state.is_main_process:
            _publish(t_dest, lambda p: save_verbalizers(verbs, p, model_type=model_type,
                                                        extra={"source_model": str(cfg.teacher.path)}))
        state.wait_for_everyone()
        _free(teacher, verbs)
    if not _skip_or_refuse(s_dest, resume, "verbalize (student)"):
        verbs = _verbalize_one(cfg, student, dataset, pad_id, cfg.verbalizers.student, "student", resume,
                               force_resume)
        model_type = get_adapter(student).model_type

        def build(p: Path) -> None:
            save_model_dir(student, tokenizer, image_processor, p,
                           metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "verbalize",
                                     "source_model": str(cfg.student.path)})
            save_verbalizers(verbs, verbalizer_dir(p), model_type=model_type)

        if state.is_main_process:
            _publish(s_dest, build)
        state.wait_for_everyone()


def _teacher_cache_path(cfg: DistillConfig) -> Path:
    return Path(cfg.teacher_cache.path).expanduser() if cfg.teacher_cache.path else cfg.out / TEACHER_CACHE_DIR


def _ensure_teacher_cache(cfg: DistillConfig, dataset: Any, pad_id: int, vocab_limit: int,
                          needed: list[int]) -> Path:
    """Build the teacher cache once (main process), or check that an existing one fits this run.

    `needed`: the sorted dataset indices step 2 reads. The cache is built for these
    (coverage "run") or for the whole dataset (coverage "dataset"); an existing cache must hold
    at least these, whichever way it was built.
    """
    from vlsi_model.distill.teacher_cache import (
        INDEX_FILE,
        IndexedDataset,
        TeacherCache,
        build_teacher_cache,
        indexed_collate,
    )
    from vlsi_model.training.data import make_collate_fn

    path = _teacher_cache_path(cfg)
    cc = cfg.teacher_cache
    state = _state()
    if not (path / INDEX_FILE).is_file() and state.is_main_process:
        teacher, _, _ = _load(cfg.teacher.path, cfg.teacher.dtype, device=state.device)
        t_verbs = load_verbalizers(cfg.out / TEACHER_VERBALIZERS_DIR, expect_hidden_size=get_adapter(teacher)
                                   .hidden_size(teacher))
        t_verbs = t_verbs.to(next(teacher.parameters()).device)
        indexed = IndexedDataset(dataset)
        collate = indexed_collate(make_collate_fn(pad_id))
        ids = needed if cc.coverage == "run" else list(range(len(indexed)))
        batches = (
            collate([indexed[i] for i in ids[start:start + cc.batch_size]])
            for start in range(0, len(ids), cc.batch_size)
        )
        log.info("building the teacher cache (k=%d, %d of %d samples) in %s", cc.k, len(ids), len(indexed), path)
        _publish(path, lambda tmp: build_teacher_cache(
            teacher, t_verbs, batches, tmp, k=cc.k, vocab_size=vocab_limit, temperature=cfg.loss.temperature,
            chunk_tokens=cfg.loss.chunk_tokens, dtype=_DTYPES[cc.dtype]))
        _free(teacher, t_verbs)
    state.wait_for_everyone()
    cache = TeacherCache(path)
    problems = []
    if cache.k != min(cc.k, vocab_limit):
        problems.append(f"k {cache.k} (config {cc.k})")
    if cache.vocab_size != vocab_limit:
        problems.append(f"vocabulary {cache.vocab_size} (shared vocabulary {vocab_limit})")
    if abs(cache.temperature - cfg.loss.temperature) > 1e-9:
        problems.append(f"temperature {cache.temperature} (config {cfg.loss.temperature})")
    missing = [i for i in needed if str(i) not in cache.samples]
    if missing:
        problems.append(f"lacks {len(missing)} of the {len(needed)} samples this run draws (e.g. {missing[0]}; "
                        "built for another seed, batch size, step count or dataset)")
    if problems:
        raise ConfigError(
            f"the teacher cache {path} does not fit this run: {'; '.join(problems)}; delete it to rebuild"
        )
    return path


def run_interact(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 2: layer-wise distillation of the verbalized student from the (frozen) verbalized teacher."""
    from vlsi_model.distill.teacher_cache import IndexedDataset, TeacherCache, indexed_collate
    from vlsi_model.models import save_model_dir
    from vlsi_model.training.data import make_collate_fn
    from vlsi_model.training.trainer import drawn_sample_indices, train

    out = cfg.out
    dest = out / INTERACTION_DIR
    if _skip_or_refuse(dest, resume, "interact"):
        return
    src = out / STUDENT_VERBALIZED_DIR
    _require(src, "the verbalized student", "interact")
    _require(out / TEACHER_VERBALIZERS_DIR, "the teacher's verbalizers", "interact")
    state = _state()
    tc = cfg.train_config("interact", "interact")

    student, tokenizer, image_processor = _load(src, cfg.student.dtype)
    s_adapter = get_adapter(student)
    s_verbs = load_verbalizers(verbalizer_dir(src), expect_hidden_size=s_adapter.hidden_size(student))
    t_meta = read_verbalizer_meta(out / TEACHER_VERBALIZERS_DIR)
    dataset = _dataset(cfg, tokenizer, image_processor)
    pad_id = int(tokenizer.pad_token_id)
    matcher = LayerMatcher(cfg.matching)
    run_dir = tc.output_path
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = MatchRecorder(s_verbs.target_layers, t_meta["target_layers"],
                             path=run_dir / f"matches_rank{state.process_index}.jsonl")
    if not resume:  # a fresh run (the trainer refuses one over existing checkpoints): old records are stale
        recorder.reset()

    teacher = t_verbs = None
    if cfg.teacher_cache.enabled:
        t_vocab = int(load_config_vocab(cfg.teacher.path))
        vocab_limit = min(s_adapter.vocab_size(student), t_vocab)
        needed = drawn_sample_indices(tc, len(dataset), state.num_processes)
        cache = TeacherCache(_ensure_teacher_cache(cfg, dataset, pad_id, vocab_limit, needed))
        train_set: Any = IndexedDataset(dataset)
        collate = indexed_collate(make_collate_fn(pad_id))
    else:
        teacher, t_tokenizer, _ = _load(cfg.teacher.path, cfg.teacher.dtype)
        _check_same_tokenizer(t_tokenizer, tokenizer)
        t_verbs = load_verbalizers(out / TEACHER_VERBALIZERS_DIR,
                                   expect_hidden_size=get_adapter(teacher).hidden_size(teacher))
        cache = None
        train_set, collate = dataset, make_collate_fn(pad_id)

    model, is_peft = _prepare_trainable(student, s_adapter, cfg.lora, "interact", tc.seed,
                                        interact_trains=cfg.student.interact_trains)
    objective = InteractionObjective(
        model, s_verbs, teacher, t_verbs, matcher, recorder, cfg.loss, teacher_cache=cache,
        freeze_student_head=cfg.student.interact_trains == "decoder",
    )
    result = train(objective, train_set, collate, tc, resume=resume, progress_desc="interact",
                   force_resume=force_resume)
    log.info("interaction: %d steps, final loss %.4f", result.steps, result.final_loss)
    state.wait_for_everyone()
    final_model = _merged(model, is_peft)

    def build(p: Path) -> None:
        save_model_dir(final_model.eval(), tokenizer, image_processor, p,
                       metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "interact",
                                 "teacher": str(cfg.teacher.path), "steps": result.steps,
                                 "final_loss": result.final_loss, "matching": cfg.matching.variant,
                                 "lora": cfg.lora.enabled and "interact" in cfg.lora.steps})
        save_verbalizers(s_verbs.eval(), verbalizer_dir(p), model_type=s_adapter.model_type)
        merged_recorder = MatchRecorder(s_verbs.target_layers, t_meta["target_layers"])
        for rank_file in sorted(run_dir.glob("matches_rank*.jsonl")):
            merged_recorder.extend_from_file(rank_file)
        merged_recorder.set_progress(0, tc.max_steps)
        merged_recorder.write(p, name=MATCHING_NAME)

    if state.is_main_process:
        _publish(dest, build)
    state.wait_for_everyone()
    _free(teacher, t_verbs, objective, model, final_model)


def run_sft(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 3: plain SFT of the interacted student; writes the deployable student to final/."""
    from vlsi_model.models import save_model_dir
    from vlsi_model.training.data import make_collate_fn
    from vlsi_model.training.sft import SFTObjective
    from vlsi_model.training.trainer import train

    out = cfg.out
    dest = out / FINAL_DIR
    if _skip_or_refuse(dest, resume, "sft"):
        return
    src = out / INTERACTION_DIR
    _require(src, "the interacted student", "sft")
    state = _state()
    tc = cfg.train_config("sft", "sft")
    student, tokenizer, image_processor = _load(src, cfg.student.dtype)
    dataset = _dataset(cfg, tokenizer, image_processor)
    model, is_peft = _prepare_trainable(student, get_adapter(student), cfg.lora, "sft", tc.seed)
    if cfg.student.freeze_vision and not is_peft:
        from vlsi_model.models import freeze_vision

        freeze_vision(model)
    result = train(SFTObjective(model), dataset, make_collate_fn(int(tokenizer.pad_token_id)), tc, resume=resume,
                   progress_desc="sft", force_resume=force_resume)
    log.info("sft: %d steps, final loss %.4f", result.steps, result.final_loss)
    state.wait_for_everyone()
    final_model = _merged(model, is_peft)
    if state.is_main_process:
        _publish(dest, lambda p: save_model_dir(
            final_model.eval(), tokenizer, image_processor, p,
            metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "sft", "teacher": str(cfg.teacher.path),
                      "steps": result.steps, "final_loss": result.final_loss},
        ))
    state.wait_for_everyone()
    _free(student, model, final_model)


STEP_FUNCTIONS: dict[str, Callable[[DistillConfig, bool, bool], None]] = {
    "verbalize": run_verbalize,
    "interact": run_interact,
    "sft": run_sft,
}


def run_distill(
    config: str | os.PathLike[str] | Mapping[str, Any] | DistillConfig,
    steps: Sequence[str] | str | None = None,
    resume: bool = False,
    force_resume: bool = False,
) -> dict[str, Path]:
    """Run the selected steps in order; returns {step: its output directory}.

    Writes output_dir/distill_config.yaml (the resolved config) first.
    """
    cfg = config if isinstance(config, DistillConfig) else load_distill_config(config)
    selected = parse_steps(steps)
    state = _state()
    if state.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg.to_dict(), cfg.out / CONFIG_COPY)
    outputs = {
        "verbalize": cfg.out / STUDENT_VERBALIZED_DIR,
        "interact": cfg.out / INTERACTION_DIR,
        "sft": cfg.out / FINAL_DIR,
    }
    for step in selected:
        STEP_FUNCTIONS[step](cfg, resume, force_resume)
    return {step: outputs[step] for step in selected}


__all__ = [
    "STEPS",
    "DistillConfig",
    "LoraSection",
    "ModelRef",
    "TargetSpec",
    "TeacherCacheSection",
    "VerbalizerSection",
    "load_distill_config",
    "parse_steps",
    "run_distill",
    "run_interact",
    "run_sft",
    "run_verbalize",
]
