"""Publishing a finished output directory in place of an older one, readable by other users.

Why by hand: no library here offers an atomic directory swap. Every artefact writer (model
directories, ONNX exports, shipped students) builds its output in a temporary sibling and
only then moves it to its name, so a reader never finds a half-written directory under it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_directory(built: Path, dest: Path) -> Path:
    """Rename the complete directory `built` to `dest`, replacing `dest` if it exists.

    The old `dest` is first moved aside into a fresh hidden sibling (two renames on the same
    filesystem, never a copy), then removed; at no moment does `dest` hold a mix of old and
    new files. `built` and `dest` must be on the same filesystem (siblings are).
    """
    built, dest = Path(built), Path(dest)
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.rename(built, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, dest)
    return dest


def readable_as_umask_allows(directory: Path) -> None:
    """Give `directory` and its files the modes the user's umask gives new files (0755 / 0644 with
    the usual 022). mkdtemp makes the folder 0700, and onnx writes external `.onnx.data` files 0600:
    either would hide the export from another user (a ROS service account) or break a copy."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
