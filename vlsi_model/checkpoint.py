"""Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL Hugging Face directory safely, with errors a user can act on.

`from_pretrained` alone would accept too much (pickled `*.bin` weights execute code when
unpickled; missing tensors are silently re-initialised at random) and report problems as
deep stack traces. Here every file is checked first, weights are safetensors only, remote
code is never trusted, nothing is fetched from a hub, and each failure is a
`ModelLoadError` naming the file and what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlsi_model.errors import ModelLoadError
from vlsi_model.manifest import read_metadata_json
from vlsi_model.models import MODEL_CLASSES, check_image_processor, quiet_progress_bars
from vlsi_model.tokenizer import QWEN2VL_CHAT_TEMPLATE

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: missing {path.name} ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The project's `vlsi_model.json` next to the weights ({} if absent or unreadable)."""
    return read_metadata_json(path)


def _check_safetensors(file: Path) -> None:
    """Parse the header; safetensors also checks that the data section covers the file exactly,
    which catches truncated copies and bad headers before from_pretrained sees them."""
    try:
        with safe_open(str(file), framework="pt") as f:
            if not list(f.keys()):
                raise ModelLoadError(f"{file}: holds no tensors")
    except SafetensorError as exc:
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc})") from exc


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "sharded weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(f"{path}: missing weight shard {shard.name} listed in {index.name}")
        return shards
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{path}: only pickle weights ({', '.join(pickled)}); they can execute code when loaded, so "
            "they are refused. Convert them to safetensors (e.g. load in a trusted environment and "
            "save_pretrained(..., which writes model.safetensors)."
        )
    raise ModelLoadError(f"{path}: missing weights (model.safetensors or model.safetensors.index.json)")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer, offline; falls back to Qwen2-VL's chat template if it has none."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: missing tokenizer files (tokenizer.json)")
    if (path / "tokenizer_config.json").exists():
        _read_json(path / "tokenizer_config.json", "tokenizer settings")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizers raises a variety of types for a broken tokenizer.json
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
    if not tokenizer.chat_template:
        # Real checkpoints often keep the template in the processor's chat_template.json.
        template_json = path / "chat_template.json"
        if template_json.is_file():
            template = _read_json(template_json, "chat template").get("chat_template")
            if isinstance(template, str) and template:
                tokenizer.chat_template = template
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using Qwen2-VL's", path)
        tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def load_image_processor(path: Path) -> Qwen2VLImageProcessorPil:
    """The image processor from preprocessor_config.json (the PIL one: no torchvision here).

    Qwen2-VL's processor class serves all three families: Qwen3-VL's differs only in its
    settings (patch 16, mean/std 0.5), which the file holds."""
    _read_json(path / "preprocessor_config.json", "image processor settings")
    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load preprocessor_config.json ({exc})") from exc


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Qwen2VLImageProcessorPil]:
    """(model in eval mode on `device`, tokenizer, image processor) from a Hugging Face directory.

    Accepts model_type qwen2_vl, qwen2_5_vl and qwen3_vl. `dtype` None keeps the checkpoint's dtype
    (as saved in config.json; float32 if unspecified), or give torch.float16/"bf16"/....
    Raises ModelLoadError for anything missing, corrupt or unsupported.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"not a directory: {path} (give the model directory, not a file in it)")

    config = _read_json(path / "config.json", "model config")
    model_type = config.get("model_type")
    cls = MODEL_CLASSES.get(str(model_type))
    if cls is None:
        raise ModelLoadError(
            f"{path / 'config.json'}: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(sorted(MODEL_CLASSES))})"
        )
    for weights in _weight_files(path):
        _check_safetensors(weights)
    tokenizer = load_tokenizer(path)
    image_processor = load_image_processor(path)

    torch_dtype = _resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {"dtype": "auto"}
    try:
        with quiet_progress_bars():
            model, info = cls.from_pretrained(
                str(path),
                use_safetensors=True,
                local_files_only=True,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    # from_pretrained fills missing tensors with random values and only warns: refuse instead.
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = [str(k) for k in missing[:5]] + [str(k[0] if isinstance(k, tuple) else k) for k in mismatched[:5]]
        detail = ", ".join(names)
        raise ModelLoadError(
            f"{path}: weights do not match config.json ({len(missing)} missing, {len(mismatched)} with the "
            f"wrong shape: {detail})"
        )
    _check_token_ids(path, model, tokenizer)
    try:
        check_image_processor(model.config, image_processor)
    except ValueError as exc:
        raise ModelLoadError(f"{path / 'preprocessor_config.json'}: {exc}") from exc
    return model.to(device).eval(), tokenizer, image_processor


def _check_token_ids(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The config's special-token ids must be the tokenizer's, or images land on the wrong tokens."""
    cfg = model.config
    for attr, token in (
        ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid != getattr(cfg, attr):
            raise ModelLoadError(
                f"{path}: tokenizer does not match the model: {token} is id {tid} in the tokenizer but "
                f"{attr}={getattr(cfg, attr)} in config.json"
            )
    vocab = cfg.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ModelLoadError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
