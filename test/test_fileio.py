"""replace_directory: a finished directory takes the place of an old one, leaving nothing behind."""

from __future__ import annotations

from pathlib import Path

from vlsi_model.fileio import replace_directory


def _built(parent: Path, name: str, files: dict[str, str]) -> Path:
    d = parent / name
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v)
    return d


def test_replaces_an_existing_directory_with_nothing_left_over(tmp_path: Path) -> None:
    dest = _built(tmp_path, "model", {"a.txt": "old", "stale.txt": "old"})
    built = _built(tmp_path, ".model.tmp", {"a.txt": "new"})
    assert replace_directory(built, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"] and (dest / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old sibling remains


def test_moves_into_place_when_nothing_is_there(tmp_path: Path) -> None:
    built = _built(tmp_path, ".x.tmp", {"f": "1"})
    replace_directory(built, tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "1" and not built.exists()


def test_export_files_get_the_modes_the_umask_gives(tmp_path):
    """mkdtemp's 0700 folder and onnx's 0600 `.onnx.data` files would hide a large export from
    another user (a ROS service account) or a copy; the export ends with umask-default modes."""
    import os
    import stat

    from vlsi_model.fileio import readable_as_umask_allows

    out = tmp_path / "export"
    out.mkdir(mode=0o700)
    data = out / "decoder.onnx.data"
    data.write_bytes(b"\0" * 8)
    data.chmod(0o600)
    before = os.umask(0o022)
    try:
        readable_as_umask_allows(out)
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE(data.stat().st_mode) == 0o644
