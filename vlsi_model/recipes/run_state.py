"""Whether a recipe's output directory already holds the finished run of a given config.

Why: the reproduction script (scripts/train_default_student.sh) is resumable: it skips a stage
whose `final/` model exists. Checking for `final/` alone also skips a stage when the YAML was
edited since that model was trained (more steps, other data, another init), and the script then
ships a model of the old config under the new one's name. Each run directory holds the resolved
config it was started with (`config.yaml` for `vlsi train` and the nano recipe,
`distill_config.yaml` for `vlsi distill`); this module compares it with the config asked for.

Keys that only decide how a run is logged or checkpointed (`BOOKKEEPING_KEYS`) are not compared:
changing them never changes the trained weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from vlsi_model.training.config import load_yaml_config

# Config keys (at any depth) that never change the weights a run ends with. output_dir is one:
# a finished run directory that was moved (`mv runs/a runs/b`) is still that config's run.
BOOKKEEPING_KEYS: frozenset[str] = frozenset({
    "save_every_steps", "keep_last_checkpoints", "log_every_steps", "eval_every_steps", "num_workers",
    "output_dir",
})
FINAL_DIR = "final"
SAVED_CONFIG_NAMES: tuple[str, ...] = ("config.yaml", "distill_config.yaml")

RunState = Literal["done", "todo"]


class StaleRunError(RuntimeError):
    """The output directory holds a finished run of a different config."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key not in BOOKKEEPING_KEYS:
                out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix.rstrip("."): value}


def config_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """"key: saved -> wanted" for every result-changing setting that differs (dotted keys, sorted)."""
    a, b = _flatten(saved), _flatten(wanted)

    return [f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}" for key in sorted(set(a) | set(b))
            if key not in a or key not in b or a[key] != b[key]]


def run_state(output_dir: str | Path, resolved_config: Mapping[str, Any]) -> RunState:
    """"done" when output_dir/final holds a model trained from `resolved_config`; "todo" when
    there is no final model yet (a partial run resumes, and the trainer itself refuses a resume
    with other trajectory settings). Raises StaleRunError, naming every differing setting, when
    a final model exists from another config: it is never overwritten or silently reused.

    `resolved_config` is the config as the run would save it (`NanoConfig.to_dict()`,
    `DistillConfig.to_dict()`), so defaults filled in at load time compare equal.
    """
    out = Path(output_dir)
    if not (out / FINAL_DIR / "config.json").is_file():
        return "todo"
    saved_path = next((out / name for name in SAVED_CONFIG_NAMES if (out / name).is_file()), None)
    if saved_path is None:
        raise StaleRunError(f"{out / FINAL_DIR} exists but {out} holds none of {list(SAVED_CONFIG_NAMES)}: "
                            "cannot tell which config trained it; move it away to retrain")
    differences = config_differences(load_yaml_config(saved_path), resolved_config)
    if differences:
        raise StaleRunError(
            f"{out / FINAL_DIR} was trained from another config ({saved_path}):\n  " + "\n  ".join(differences)
            + f"\nmove {out} away (or set another output_dir) to train this config; nothing was changed")
    return "done"


__all__ = ["BOOKKEEPING_KEYS", "RunState", "StaleRunError", "config_differences", "run_state"]
