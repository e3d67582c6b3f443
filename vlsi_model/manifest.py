"""The export directory's contract (`export_manifest.json`), readable without torch or onnx.

Everything a runtime (ONNX Runtime here, TensorRT on a Jetson) needs to answer questions from
an export directory alone is written by `onnx_export` and described here: graph files and
their input/output names, dtypes and dynamic axes, the text/vision hyper-parameters the
numpy input builders need, stop tokens, image size limits, and provenance (sha256 of the
source weights, tool versions) so a stale export is recognisable.

Directory layout:
  vision.onnx            pixel patches (+ rotary/segment inputs) -> merged image embeddings
                         (Qwen3-VL: + position-grid taps in, DeepStack features out)
  decoder.onnx           prefill and decode (past length 0 = prefill) -> logits + present KV
                         (Qwen3-VL: + the DeepStack features at the image tokens in)
  embed_tokens.npy       the token embedding table [vocab, hidden] (model dtype)
  rope.npz               text_inv_freq, vision_inv_freq (exact float32 copies of the model's)
  tokenizer.json, tokenizer_config.json, chat_template.*, preprocessor_config.json,
  config.json, generation_config.json, vlsi_model.json   copied from the model directory
  export_manifest.json   this contract
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlsi_model.errors import ModelLoadError

MANIFEST_FILE = "export_manifest.json"
FORMAT = "vlsi-onnx-export"
FORMAT_VERSION = 1
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBED_FILE = "embed_tokens.npy"
ROPE_FILE = "rope.npz"
# Copied from the model directory when present, so the runtime needs no PyTorch model.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "config.json",
    "generation_config.json",
    "vlsi_model.json",
)
REQUIRED_KEYS = ("format", "format_version", "model_type", "text", "vision", "image", "graphs", "files")
# The architectures `vlsi export` (and so ONNX Runtime / TensorRT) handles.
EXPORTABLE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def model_type_of(model_dir: str | Path) -> str | None:
    """config.json's model_type in `model_dir` (None if absent or unreadable: the loader reports that)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return str(model_type) if model_type is not None else None


def export_unsupported(model_dir: str | Path) -> str | None:
    """Why the model in `model_dir` cannot be exported to ONNX (and so served by onnxruntime or
    tensorrt), or None when it can or its type is unknown here."""
    model_type = model_type_of(model_dir)
    if model_type is None or model_type in EXPORTABLE_MODEL_TYPES:
        return None
    return (f"ONNX export of {model_type} is not supported yet (supported: {', '.join(EXPORTABLE_MODEL_TYPES)}); "
            "serve it with the torch backend")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed (weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def has_export(path: str | Path) -> bool:
    """True when `path` holds an export manifest (cheap check for backend selection)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def find_export_dir(model_path: str | Path, engine_dir: str | Path | None = None) -> Path | None:
    """The export directory for a model: `engine_dir` if given, `model_path` itself if it is one,
    else `<model_path>/onnx`; None when there is none."""
    candidates = [Path(engine_dir)] if engine_dir is not None else [Path(model_path), Path(model_path) / "onnx"]
    for cand in candidates:
        if has_export(cand):
            return cand
    return None


def load_manifest(export_dir: str | Path, graphs: bool = True) -> dict[str, Any]:
    """Read and sanity-check `export_manifest.json`; ModelLoadError saying what is wrong.
    `graphs=False`: the ONNX graphs need not be there (an engine set holds the manifest, the
    embedding table and the rope tables beside its plans, not the graphs)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{export_dir}: no {MANIFEST_FILE}; create an export with "
            f"`vlsi export --model MODEL_DIR --out {export_dir}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a vlsi ONNX export manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: export format version {data.get('format_version')} but this vlsi_model reads version "
            f"{FORMAT_VERSION}; re-run `vlsi export`"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelLoadError(f"{path}: manifest lacks {', '.join(missing)}")
    for key in ("vision", "decoder", "embed_tokens", "rope") if graphs else ("embed_tokens", "rope"):
        name = data["files"].get(key)
        if not name or not (export_dir / name).is_file():
            raise ModelLoadError(f"{export_dir}: missing {name or key} listed in {MANIFEST_FILE}; re-run `vlsi export`")
    return data


def read_metadata_json(export_dir: str | Path) -> dict[str, Any]:
    """The model's `vlsi_model.json` copied into the export ({} if absent or unreadable)."""
    try:
        data = json.loads((Path(export_dir) / "vlsi_model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
