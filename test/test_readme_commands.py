"""The README's cheap commands run as written: every ```bash block right after a
`<!-- readme-test -->` line runs top to bottom with `bash -e` from the repository root, with the
`runs/readme` paths it writes to pointed at a temporary directory (the test writes nothing in the
repository). The tests run inside the project environment (`scripts/in_env.sh pytest`), so the
blocks' `vlsi` is the environment's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test -->"
BLOCK = re.compile(rf"^{re.escape(MARK)}[ \t]*\n```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def marked_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_is_a_short_guide():
    """Issue 23: a user's guide read in ten minutes (at most ~15 KB); lab notes belong in docs/."""
    assert len((REPO / "README.md").read_bytes()) <= 15 * 1024


def test_the_readme_marks_its_cheap_blocks():
    readme = (REPO / "README.md").read_text()
    blocks = marked_blocks()
    assert len(blocks) >= 2, "README.md should mark at least two cheap ```bash blocks with " + MARK
    # a mark that is not right before a ```bash block would silently test nothing
    assert readme.count(MARK) == len(blocks), f"every {MARK} line must be followed by a ```bash block"
    for block in blocks:
        assert "runs/readme" in block, f"a marked block writes only under runs/readme:\n{block}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(marked_blocks())))
def test_readme_block_runs(index, tmp_path):
    block = marked_blocks()[index]
    script = block.replace("runs/readme", str(tmp_path / "readme"))
    # the environment's `vlsi` first on PATH, also when pytest runs without scripts/in_env.sh
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, (
        f"README block {index} failed (exit {done.returncode}):\n{block}\n"
        f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    )
