"""Where named engine sets live: the top-level `trt_engines/` folder.

`vlsi build-engine --name NAME` (or its default name, the model's) writes TensorRT engines to
`trt_engines/NAME/`, and every `engine_dir` given to `load_engine` (the node's parameter,
`ros2 launch ... engine_dir:=NAME`, `vlsi bench --engine-dir`) is either a path or such a bare
name. Why a name and not only paths: engines are built per device
and per precision, so a robot keeps several sets side by side (`student-fp16`, `student-int8`)
and the launch command should not depend on where the repository was checked out.

The folder is `./trt_engines` (the repository root, where `make demo` and the README's commands
run) unless `VLSI_TRT_ENGINES` names another one (e.g. a larger disk on a Jetson).
"""

from __future__ import annotations

import os
from pathlib import Path

ENGINES_ENV = "VLSI_TRT_ENGINES"
ENGINES_FOLDER = "trt_engines"


def engines_root() -> Path:
    """The folder that holds named engine sets: $VLSI_TRT_ENGINES, else ./trt_engines."""
    return Path(os.environ.get(ENGINES_ENV) or ENGINES_FOLDER)


def is_engine_name(engine_dir: str | Path) -> bool:
    """A bare name ("student-fp16"), as opposed to a path ("./x", "a/b", "/abs", "~/x", ".", "..")."""
    text = str(engine_dir)
    if not text or text in (".", "..") or text.startswith("~"):
        return False
    return os.sep not in text and "/" not in text


def resolve_engine_dir(engine_dir: str | Path) -> Path:
    """The directory `engine_dir` means: an existing path as given; else, for a bare name,
    `engines_root() / name`; else the path as given (the caller's "not found" names it)."""
    path = Path(engine_dir).expanduser()
    if path.is_dir() or not is_engine_name(engine_dir):
        return path
    return engines_root() / str(engine_dir)


def named_engine_dir(name: str) -> Path:
    """Where `vlsi build-engine --name NAME` writes: engines_root() / NAME (a bare name only)."""
    if not is_engine_name(name):
        raise ValueError(f"an engine set name is one folder name (e.g. student-fp16), got {name!r}")
    return engines_root() / name
