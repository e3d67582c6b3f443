"""The layout's rules (docs/architecture.md), checked on every import of every library module,
lazy ones included: a rule that is only written down erodes with the first convenient import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "vlsi_model"
# ROS client libraries, message packages (*_msgs, *_interfaces), rosidl, launch, ament, bag tools
# that need a ROS install (rosbag2_py); the pure-Python `rosbags` reader is allowed.
ROS_MODULE = re.compile(r"^(rclpy|rcl_\w+|rosidl\w*|rosbag2_py|ament_\w+|launch(_\w+)?|cv_bridge|vlsi_ros|"
                        r"\w+_msgs|\w+_interfaces)$")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions' lazy imports too), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add("<relative import>")  # the library imports absolutely; a relative one would dodge these checks
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _library_files() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_the_library_never_imports_ros():
    offenders = {_module(p): sorted(m for m in _imports(p) if ROS_MODULE.match(m.split(".")[0])
                                    or m == "<relative import>") for p in _library_files()}
    assert not {k: v for k, v in offenders.items() if v}


def test_dependencies_run_one_way():
    """engine/ never imports export/ (the exporter imports the backends for its parity checks);
    the shared errors and the export manifest import nothing else of the library."""
    for path in (LIBRARY / "engine").glob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("vlsi_model.export")], path
    for path in (LIBRARY / "data").glob("*.py"):  # making data needs no distillation code
        assert not [m for m in _imports(path) if m.startswith("vlsi_model.distill")], path
    allowed = {"errors.py": set(), "manifest.py": {"errors"}, "engine_dirs.py": {"errors", "manifest"}}
    for leaf, may_use in allowed.items():
        own = {m.split(".")[1] for m in _imports(LIBRARY / leaf) if m.startswith("vlsi_model.")}
        assert own <= may_use, (leaf, own)


def test_data_readers_need_no_torch():
    """Reading LLaVA files, bags and generating scenes works where torch is absent (a Jetson's data
    tools, the synthetic camera): importing them, with everything they import, loads no torch."""
    modules = ["vlsi_model.data." + n for n in ("llava", "scenes", "render", "question_families", "scene_dataset",
                                                "bags")] + ["vlsi_model.engine", "vlsi_model.manifest",
                                                            "vlsi_model.engine_dirs"]
    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_long_library_files_say_why():
    long_files = [p for p in _library_files() + sorted((REPO / "vlsi_ros").glob("*.py"))
                  if len(p.read_text(encoding="utf-8").splitlines()) > 620]
    unexplained = [str(p.relative_to(REPO)) for p in long_files
                   if "Why one file" not in (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "")]
    assert not unexplained, f"over ~600 lines without a reason at the top: {unexplained}"


def test_every_file_the_architecture_names_exists():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    folders = "vlsi_model|vlsi_ros|benchmarks|scripts|test|launch|config"
    named = set(re.findall(rf"`((?:{folders})/[\w/.]+\.(?:py|yaml|sh))`", text))
    assert named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing
