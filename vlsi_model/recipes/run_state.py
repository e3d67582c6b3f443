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

from collections.abc import Callable, Mapping, Sequence
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


def _last_change(path: Path) -> float:
    """Modification time of a file, or of the newest file directly inside a directory."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=0.0)
    return path.stat().st_mtime


def run_state(
    output_dir: str | Path,
    resolved_config: Mapping[str, Any],
    normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    inputs: Sequence[str | Path] = (),
) -> RunState:
    """"done" when output_dir/final holds a model trained from `resolved_config`; "todo" when
    there is no final model yet (a partial run resumes, and the trainer itself refuses a resume
    with other trajectory settings). Raises StaleRunError, naming every differing setting, when
    a final model exists from another config: it is never overwritten or silently reused.

    `resolved_config` is the config as the run would save it (`NanoConfig.to_dict()`,
    `DistillConfig.to_dict()`); `normalize` passes the saved one through the same loader, so
    defaults filled in at load time (or added to the config classes since) compare equal.
    `inputs` are the files and model directories the run read (its start model, its data): one
    changed after the final model was written (an earlier stage retrained, data regenerated in
    place) makes the run stale too, although its config text is the same.
    """
    out = Path(output_dir)
    final_config = out / FINAL_DIR / "config.json"
    if not final_config.is_file():
        return "todo"
    saved_path = next((out / name for name in SAVED_CONFIG_NAMES if (out / name).is_file()), None)
    if saved_path is None:
        raise StaleRunError(f"{out / FINAL_DIR} exists but {out} holds none of {list(SAVED_CONFIG_NAMES)}: "
                            "cannot tell which config trained it; move it away to retrain")
    saved: Mapping[str, Any] = load_yaml_config(saved_path)
    if normalize is not None:
        try:
            saved = normalize(saved)
        except (ValueError, TypeError) as exc:
            raise StaleRunError(f"{saved_path} no longer loads as a config ({exc}); move {out} away to retrain") \
                from None
    problems = config_differences(saved, resolved_config)
    trained_at = final_config.stat().st_mtime
    problems += [f"{p} changed after this run" for p in map(Path, inputs)
                 if p.exists() and _last_change(p) > trained_at]
    if problems:
        raise StaleRunError(
            f"{out / FINAL_DIR} was trained from another config or inputs ({saved_path}):\n  "
            + "\n  ".join(problems)
            + f"\nmove {out} away (or set another output_dir) to train this config; nothing was changed")
    return "done"


__all__ = ["BOOKKEEPING_KEYS", "RunState", "StaleRunError", "config_differences", "run_state"]
