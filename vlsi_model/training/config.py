"""Training configuration: the `TrainConfig` dataclass and strict YAML -> dataclass loading.

Every training recipe (SFT here, the VLsI distillation steps elsewhere) reads a YAML file
with a `train:` section holding `TrainConfig` fields, next to recipe-specific sections. The
helpers below are shared so every recipe rejects the same mistakes the same way:

* unknown keys are an error naming them (a typo such as `lerning_rate` silently falling back
  to a default is the classic "parameter declared but ignored" bug);
* values are coerced to the field's annotated type with an error naming the key. This is
  needed, not pedantry: PyYAML (YAML 1.1) reads `1e-3` as the *string* "1e-3", and lists
  where we want tuples;
* missing required keys are named.

pydantic would do this too but is not a dependency of the ML library; the coercion needed
here (int, float, bool, str, Optional, Literal, fixed tuples, nested dataclasses, dicts)
is small enough to write out.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and how to fix it."""


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError with file (and line) if unreadable.

    `yaml.safe_load` only: a config file can never construct arbitrary Python objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to type `tp` (as annotated on a dataclass field), or ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return dataclass_from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys, missing required keys and
    values of the wrong type are ConfigErrors that name the key (as `where.key`).

    Nested dataclass fields take nested mappings, so a recipe config can be one dataclass
    tree (e.g. a distill config with a `train:` section of type TrainConfig). Errors raised
    by the dataclass's own `__post_init__` validation (ValueError) become ConfigErrors too.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(valid keys: {', '.join(fields)})"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints.get(name, Any), f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a (nested) dataclass: tuples become lists, Paths strings."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def save_yaml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write `data` as YAML (keys in the given order), via a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging of one training run.

    Defaults are the settings measured to work for the project's small Qwen2-VL models on
    CPU (shared/NANO_NOTES.md: peak LR 1e-3, 50 warmup steps, cosine to 0.1x, AdamW betas
    (0.9, 0.98), weight decay 0.01, clipping at 1.0). For billion-parameter checkpoints use
    the paper's 1e-4 -> 1e-6 (lr 1e-4, min_lr_ratio 0.01).

    Batch geometry: one optimizer step consumes a *global batch* of
    per_device_batch_size x grad_accum_steps x num_processes samples, cut into micro-batches
    of per_device_batch_size (see `trainer.GlobalBatchSampler`). Keeping
    per_device_batch_size and that product fixed keeps training identical (up to float
    reduction order) whatever the number of processes.
    """

    output_dir: str
    max_steps: int = 1000
    per_device_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine floor: the LR decays from lr to min_lr_ratio * lr
    warmup_steps: int = 50
    weight_decay: float = 0.01  # applied to >= 2-D weights only (not biases, norms)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    save_every_steps: int = 500  # 0: no intermediate checkpoints (one is still written at the end)
    keep_last_checkpoints: int = 2
    log_every_steps: int = 10
    gradient_checkpointing: bool = False
    eval_every_steps: int | None = None  # None: evaluate only at the end (when an eval set is given)
    num_workers: int = 0  # DataLoader worker processes per training process
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient in a step

    def __post_init__(self) -> None:
        if not str(self.output_dir).strip():
            raise ValueError("output_dir must not be empty")
        for name in ("max_steps", "per_device_batch_size", "grad_accum_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last_checkpoints < 1:
            raise ValueError(f"keep_last_checkpoints must be >= 1, got {self.keep_last_checkpoints}")
        if self.eval_every_steps is not None and self.eval_every_steps < 1:
            raise ValueError(f"eval_every_steps must be >= 1 or null, got {self.eval_every_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or null, got {self.max_grad_norm}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {self.mixed_precision!r}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "train") -> TrainConfig:
        """Strictly from a mapping (e.g. a YAML `train:` section); ConfigError names bad keys."""
        return dataclass_from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = "train") -> TrainConfig:
        """From the `section` of a YAML file (None: the whole file is the TrainConfig)."""
        data = load_yaml_config(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path}: missing section {section}:")
            data = data[section]
        return cls.from_dict(data or {}, where=f"{path}:{section}" if section else str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with `changes` applied (e.g. CLI overrides of max_steps / output_dir)."""
        return dataclasses.replace(self, **changes)


__all__ = [
    "ConfigError",
    "MIXED_PRECISION_CHOICES",
    "TrainConfig",
    "dataclass_from_dict",
    "dataclass_to_dict",
    "load_yaml_config",
    "save_yaml",
]
