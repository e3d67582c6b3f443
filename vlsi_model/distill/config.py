"""`vlsi distill`'s configuration: the YAML sections as dataclasses, and the output layout.

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
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlsi_model.distill.losses import LossConfig
from vlsi_model.distill.matching import MatchConfig
from vlsi_model.training.config import (
    ConfigError,
    TrainConfig,
    dataclass_from_dict,
    dataclass_to_dict,
    load_yaml_config,
)
from vlsi_model.training.mixture import DataSource

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


__all__ = [
    "CONFIG_COPY", "DEFAULT_LORA_TARGETS", "FINAL_DIR", "INTERACTION_DIR", "MATCHING_NAME", "RUNS_DIR", "STEPS",
    "STUDENT_VERBALIZED_DIR", "TEACHER_CACHE_DIR", "TEACHER_VERBALIZERS_DIR", "DataSection", "DistillConfig",
    "LoraSection", "ModelRef", "TargetSpec", "TeacherCacheSection", "VerbalizerSection", "load_distill_config",
    "parse_steps",
]
