"""Shared by the ONNX / ONNX Runtime / TensorRT / bench tests: one export per (model, options) per
test session, so four test modules do not export the same tiny model four times (each export is
a few seconds of torch.onnx + a parity run on 2 shared cores)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_ROOT: Path | None = None
_CACHE: dict[tuple, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="vlsi-test-exports-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def export_once(model_dir: Path, **options) -> Path:
    """Export `model_dir` with ExportOptions(**options) once per session; returns the export dir."""
    from vlsi_model.export.onnx_export import ExportOptions, export_model

    key = (str(model_dir), tuple(sorted(options.items())))
    if key not in _CACHE:
        out = _root() / f"export{len(_CACHE)}"
        export_model(model_dir, out, ExportOptions(**options))
        _CACHE[key] = out
    return _CACHE[key]


def build_windowed_qwen25vl(root: Path, tokenizer) -> Path:
    """A tiny Qwen2.5-VL whose windows (56 px = 2x2 merged tokens) are smaller than its images
    (up to 168x168), so windowed attention really splits the image; full attention in block 1."""
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen25vl_config

    config = tiny_qwen25vl_config(tokenizer=tokenizer, window_size=56, vision_depth=3, fullatt_block_indexes=(1,))
    model = build_model(config, seed=5)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=168 * 168)
    return save_model_dir(model, tokenizer, processor, root / "model", metadata={"placeholder": False, "test": True})
