"""Import a script (benchmarks/, scripts/) as a module, for the tests that run it (scripts are not a
package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path) -> ModuleType:
    """The script at `path` as a module named by its stem (registered in sys.modules: dataclasses
    look their module up while the class is built)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `name`."""
    return load_script(BENCHMARKS / f"{name}.py")
