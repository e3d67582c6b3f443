#!/usr/bin/env python3
"""Point the ROS 2 wheels' CMake exports at this virtual environment's Python.

Why by hand: the PyPI ROS 2 wheels ship CMake config files that hard-code the include
directories of the machine that built them (/opt/python/cp311-cp311/...). colcon builds of
packages with their own interfaces fail until those paths name this Python's headers and
numpy's include directory. The patch is idempotent.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

import numpy

BUILD_HOST_NUMPY = "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include"
NUMPY_INCLUDE = re.compile(r"[^;\"\s]*/site-packages/numpy/_core/include")
BUILD_HOST_PYTHON = "/opt/python/cp311-cp311/include/python3.11"


def patch_cmake_exports(prefix: Path) -> int:
    """Rewrite build-host (or earlier) paths in every *.cmake under prefix/share; returns files changed."""
    # Real paths: CMake refuses exported include directories inside the source tree, so a
    # `.venv` link in the repository must resolve to the environment outside it.
    replacements = {
        BUILD_HOST_NUMPY: os.path.realpath(numpy.get_include()),
        BUILD_HOST_PYTHON: sysconfig.get_paths()["include"],
    }
    changed = 0
    for path in (prefix / "share").rglob("*.cmake"):
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        new = text
        for old, replacement in replacements.items():
            new = new.replace(old, replacement)
        # A venv that was patched before and then moved behind a link.
        new = NUMPY_INCLUDE.sub(replacements[BUILD_HOST_NUMPY], new)
        if new != text:
            path.write_text(new, encoding="utf-8", errors="surrogateescape")
            changed += 1
    return changed


if __name__ == "__main__":
    prefix = Path(sys.argv[1] if len(sys.argv) > 1 else sys.prefix)
    print(f"patched {patch_cmake_exports(prefix)} CMake export files under {prefix}/share")
