"""Where named engine sets live: the top-level `trt_engines/` folder.

`vlsi build-engine --name NAME` (default: the model's name, see `engine_set_name`) writes
TensorRT engines to `trt_engines/NAME/`, and every `engine_dir` given to `load_engine` (the
node's parameter, `ros2 launch ... engine_dir:=NAME`, `vlsi bench --engine-dir`) is either a
path or such a bare name. Why names: engines are built per device and per precision, so a robot
keeps several sets side by side (`student-fp16`, `student-int8`) and picks one by name.

The folder is `./trt_engines`, relative to where the command runs (the repository root for the
README's commands), unless `VLSI_TRT_ENGINES` names another one: set it (e.g. in the robot's
service environment) when `ros2 launch` runs from anywhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlsi_model.manifest import MANIFEST_FILE

ENGINES_ENV = "VLSI_TRT_ENGINES"
ENGINES_FOLDER = "trt_engines"
# Training writes the finished model to <run>/final: the run's name says which model it is.
GENERIC_MODEL_DIRS = ("final", "model", "onnx", "export")


def engines_root() -> Path:
    """The folder that holds named engine sets: $VLSI_TRT_ENGINES, else ./trt_engines (absolute)."""
    return Path(os.environ.get(ENGINES_ENV) or ENGINES_FOLDER).expanduser().absolute()


def is_engine_name(engine_dir: str | Path) -> bool:
    """A bare name ("student-fp16"), as opposed to a path ("./x", "a/b", "/abs", "~/x", ".", "..")."""
    text = str(engine_dir)
    if not text.strip() or text in (".", "..") or text.startswith("~"):
        return False
    return os.sep not in text and "/" not in text


def resolve_engine_dir(engine_dir: str | Path) -> Path:
    """The directory `engine_dir` means. A bare name is the set `engines_root() / name` when that
    exists (a set wins over a same-named folder of the current directory, such as `test`), else
    an existing directory of that name, else the set's path (so "not found" names where a set would
    be). Anything else is a path, `~` expanded."""
    if is_engine_name(engine_dir):
        named = engines_root() / str(engine_dir)
        if named.is_dir() or not Path(engine_dir).is_dir():
            return named
    return Path(engine_dir).expanduser()


def engine_set_name(model_dir: str | Path, recorded_name: str | None = None) -> str:
    """The default name of a model's engine set: the name its metadata records, else its folder's
    name, or its run's name when the folder is a generic one (`runs/my_robot/final` -> my_robot)."""
    if recorded_name and recorded_name not in GENERIC_MODEL_DIRS:
        return recorded_name
    path = Path(model_dir).expanduser().resolve()  # the same name at build and at run time, links or not
    while path.name in GENERIC_MODEL_DIRS and path.parent != path:
        path = path.parent
    return path.name or "model"


def named_engine_dir(name: str) -> Path:
    """Where `vlsi build-engine --name NAME` writes: engines_root() / NAME (a bare name only)."""
    if not is_engine_name(name):
        raise ValueError(f"an engine set name is one folder name (e.g. student-fp16), got {name!r}")
    return engines_root() / name


def set_source(engine_dir: Path) -> str | None:
    """The model directory an engine set was exported from (its copied export manifest's
    `source_dir`), or None when the set records none."""
    try:
        return json.loads((engine_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("source_dir")
    except (OSError, ValueError):
        return None
