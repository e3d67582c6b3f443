"""Configs, construction and saving of Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built locally.

The project's students, teachers and test models are the Hugging Face Qwen2-VL,
Qwen2.5-VL and Qwen3-VL architectures at small sizes, created from a config (there is no model hub
here). This module is the one place that knows how to size such a config, wire its
special-token ids to a tokenizer, initialise it reproducibly and write it as a standard
Hugging Face directory that `from_pretrained` (and `vlsi_model.checkpoint.load_model_dir`)
loads directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from vlsi_model.fileio import replace_directory
from vlsi_model.tokenizer import SPECIAL_TOKEN_IDS

# model_type in config.json -> model class. The only architectures this project runs.
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}

PATCH_SIZE = 14  # Qwen2-VL, Qwen2.5-VL
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
QWEN3VL_PATCH_SIZE = 16
# Qwen3-VL normalises pixels with mean = std = 0.5 (Qwen2-VL: the CLIP statistics, the
# image processor's defaults); a processor saved with the wrong ones reloads "fine" and
# feeds the vision tower shifted inputs.
QWEN3VL_IMAGE_MEAN = (0.5, 0.5, 0.5)
QWEN3VL_IMAGE_STD = (0.5, 0.5, 0.5)

# Written next to the weights by `save_model_dir(..., metadata=...)`: provenance the HF files
# have no place for (placeholder or trained, seed, recipe).
METADATA_FILE = "vlsi_model.json"


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-call tqdm bars ("Loading weights", "Writing model shards").

    They are noise on a robot's log or in a CLI answering one question; restored afterwards
    so a caller that wants them keeps them elsewhere.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class TokenIds:
    """The token ids a Qwen2-VL config must agree on with its tokenizer."""

    pad: int
    eos: int  # <|im_end|>: ends an assistant turn
    endoftext: int
    image: int
    video: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenIds:
        """Read the ids from `tokenizer`; raises ValueError if it lacks a Qwen2-VL special token."""

        def tid(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([token])
            if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token} token; it is not a Qwen2-VL tokenizer")
            return int(ids[0])

        endoftext = tid("<|endoftext|>")
        return cls(
            pad=int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else endoftext,
            eos=tid("<|im_end|>"),
            endoftext=endoftext,
            image=tid("<|image_pad|>"),
            video=tid("<|video_pad|>"),
            vision_start=tid("<|vision_start|>"),
            vision_end=tid("<|vision_end|>"),
        )

    @classmethod
    def default(cls) -> TokenIds:
        """Ids of every tokenizer made by `vlsi_model.tokenizer.train_bpe_tokenizer` (specials first)."""
        s = SPECIAL_TOKEN_IDS
        return cls(
            pad=s["<|endoftext|>"],
            eos=s["<|im_end|>"],
            endoftext=s["<|endoftext|>"],
            image=s["<|image_pad|>"],
            video=s["<|video_pad|>"],
            vision_start=s["<|vision_start|>"],
            vision_end=s["<|vision_end|>"],
        )


def _resolve_ids(
    vocab_size: int | None, tokenizer: PreTrainedTokenizerBase | None, token_ids: TokenIds | None
) -> tuple[int, TokenIds]:
    if tokenizer is not None:
        token_ids = token_ids or TokenIds.from_tokenizer(tokenizer)
        vocab_size = vocab_size or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    if vocab_size is None:
        raise ValueError("give vocab_size or tokenizer")
    token_ids = token_ids or TokenIds.default()
    top = max(token_ids.__dict__.values())
    if top >= vocab_size:
        raise ValueError(f"special token id {top} does not fit vocab_size {vocab_size}")
    return vocab_size, token_ids


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like Qwen2-VL's [16, 24, 24] of 64."""
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"head_dim {head_dim} too small for M-RoPE (needs an even number >= 6)")
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's [24, 20, 20] of 64 frequencies scaled to head_dim/2 (interleaved T/H/W).

    Qwen3-VL interleaves the axes (frequency k belongs to H if k % 3 == 1 and k < 3 * h, to W
    if k % 3 == 2 and k < 3 * w, else to T), so h and w must stay below about a third each.
    """
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"head_dim {head_dim} too small for M-RoPE (needs an even number >= 6)")
    h = max(1, round(half * 20 / 64))
    return [half - 2 * h, h, h]


def _text_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int | None,
    max_position_embeddings: int,
    ids: TokenIds,
    rope_theta: float = 1_000_000.0,
) -> dict[str, Any]:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(rope_theta),
            "mrope_section": _mrope_section(hidden_size // num_heads),
        },
        "bos_token_id": ids.endoftext,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
    }


def _vl_config(cls: Any, text: dict[str, Any], vision: dict[str, Any], ids: TokenIds, tie_word_embeddings: bool):
    """A VL config from its text and vision parts, with the special-token ids of the tokenizer."""
    return cls(text_config=text, vision_config=vision, image_token_id=ids.image, video_token_id=ids.video,
               vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
               tie_word_embeddings=tie_word_embeddings)


def tiny_qwen2vl_config(
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_embed_dim: int = 64,
    vision_heads: int = 4,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_ids: TokenIds | None = None,
) -> Qwen2VLConfig:
    """A small Qwen2-VL config (patch 14, merge 2) whose special-token ids match the tokenizer.

    Give `tokenizer` to read the ids (and the vocabulary size) from it; otherwise the ids of
    `train_bpe_tokenizer` tokenizers are used. A mismatch between config and tokenizer ids is
    the classic silent bug (image features scattered nowhere), hence the checks.
    """
    vocab_size, ids = _resolve_ids(vocab_size, tokenizer, token_ids)
    text = _text_config(
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        max_position_embeddings, ids, rope_theta,
    )
    vision = {
        "depth": vision_depth,
        "embed_dim": vision_embed_dim,
        "hidden_size": hidden_size,  # the merger projects vision features to the text width
        "num_heads": vision_heads,
        "mlp_ratio": 4,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "in_channels": 3,
    }
    return _vl_config(Qwen2VLConfig, text, vision, ids, tie_word_embeddings)


def tiny_qwen25vl_config(
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_intermediate_size: int | None = None,
    vision_heads: int = 4,
    window_size: int = 112,
    fullatt_block_indexes: tuple[int, ...] | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_ids: TokenIds | None = None,
) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config: same text side as Qwen2-VL, windowed-attention vision tower.

    `window_size` is in input pixels (112 = 4x4 merged tokens per window, as in the real
    models); the last vision block uses full attention unless `fullatt_block_indexes` says
    otherwise, so windowed and full attention are both exercised even at depth 2.
    """
    vocab_size, ids = _resolve_ids(vocab_size, tokenizer, token_ids)
    text = _text_config(
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        max_position_embeddings, ids, rope_theta,
    )
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size or 2 * vision_hidden_size,
        "out_hidden_size": hidden_size,
        "num_heads": vision_heads,
        "hidden_act": "silu",
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "window_size": window_size,
        "fullatt_block_indexes": list(fullatt_block_indexes or (vision_depth - 1,)),
        "tokens_per_second": 2,
        "in_channels": 3,
    }
    return _vl_config(Qwen2_5_VLConfig, text, vision, ids, tie_word_embeddings)


def tiny_qwen3vl_config(
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_intermediate_size: int | None = None,
    vision_heads: int = 4,
    deepstack_visual_indexes: tuple[int, ...] | None = None,
    num_position_embeddings: int = 64,
    max_position_embeddings: int = 4096,
    rope_theta: float = 5_000_000.0,
    tie_word_embeddings: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_ids: TokenIds | None = None,
) -> Qwen3VLConfig:
    """A small Qwen3-VL config (patch 16, merge 2, DeepStack) whose special-token ids match the tokenizer.

    Text side as in Qwen3-VL: explicit `head_dim` (default hidden_size // num_heads; the real
    models use 128 whatever the width), q/k norms, interleaved M-RoPE. Vision side: a ViT of
    `vision_depth` blocks with a learned position grid of `num_position_embeddings` (a
    square; resampled to each image) and DeepStack: the features after the vision blocks in
    `deepstack_visual_indexes` (default: the first min(2, depth) blocks) go through their own
    mergers and are added to the outputs of text layers 0, 1, ... at the image tokens. So
    there must be no more DeepStack indexes than text layers. The image processor to pair
    it with is `make_image_processor(model_type="qwen3_vl")` (patch 16, mean/std 0.5).
    """
    vocab_size, ids = _resolve_ids(vocab_size, tokenizer, token_ids)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError("hidden_size must divide by num_heads (or give head_dim)")
        head_dim = hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must divide by num_kv_heads")
    if deepstack_visual_indexes is None:
        deepstack_visual_indexes = tuple(range(min(2, vision_depth)))
    deepstack = [int(i) for i in deepstack_visual_indexes]
    if any(not 0 <= i < vision_depth for i in deepstack) or len(set(deepstack)) != len(deepstack):
        raise ValueError(f"deepstack_visual_indexes {deepstack} must be distinct vision blocks in [0, {vision_depth})")
    if len(deepstack) > num_layers:
        raise ValueError(f"{len(deepstack)} DeepStack indexes but only {num_layers} text layers to add them to")
    side = int(round(num_position_embeddings**0.5))
    if side * side != num_position_embeddings:
        raise ValueError(f"num_position_embeddings {num_position_embeddings} must be a square (a side x side grid)")
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(rope_theta),
            "mrope_section": _interleaved_mrope_section(head_dim),
            "mrope_interleaved": True,
        },
        "bos_token_id": ids.endoftext,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size or 4 * vision_hidden_size,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,  # the mergers project vision features to the text width
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": QWEN3VL_PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "num_position_embeddings": num_position_embeddings,
        "deepstack_visual_indexes": deepstack,
        "in_channels": 3,
    }
    return _vl_config(Qwen3VLConfig, text, vision, ids, tie_word_embeddings)


def model_class_for(model_type: str) -> type[PreTrainedModel]:
    """The model class for a config.json `model_type`; ValueError for anything else."""
    try:
        return MODEL_CLASSES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(MODEL_CLASSES))})"
        ) from None


def generation_config_for(config: PretrainedConfig) -> GenerationConfig:
    """Greedy generation that stops on <|im_end|> or <|endoftext|>, as Qwen2-VL-Instruct's does."""
    text = config.get_text_config()
    eos = [int(text.eos_token_id)]
    if text.bos_token_id is not None and text.bos_token_id not in eos:
        eos.append(int(text.bos_token_id))  # <|endoftext|>, the second stop token of Qwen's checkpoints
    return GenerationConfig(
        eos_token_id=eos,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        do_sample=False,
    )


def build_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model for `config`, identical for the same seed, in eval mode.

    The global RNG is forked, so building a model does not change the caller's random stream.
    """
    cls = model_class_for(config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config = generation_config_for(config)
    return model.eval()


def freeze_vision(model: PreTrainedModel, include_merger: bool = True) -> int:
    """Keep the vision encoder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model fixed (``requires_grad=False``),
    its merger (Qwen3-VL: and its DeepStack mergers) too unless `include_merger` is False;
    returns the number of frozen parameters.

    Why: the project's small models train their language model on a frozen random vision
    encoder. A linear probe reads an object's shape from its own image token at 0.996 with
    the random encoder + merger, but at 0.79 once the merger trained along with the LM, and
    the LM then never learns shape; every later fine-tuning (SFT, VLsI's step 3) must keep
    the encoder as it was or it erodes what the student reads.
    """
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no vision encoder (model.visual) to freeze")
    frozen = 0
    for name, p in visual.named_parameters():
        if include_merger or not name.startswith(("merger.", "deepstack_merger_list.")):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def make_image_processor(
    min_pixels: int = 56 * 56, max_pixels: int = 224 * 224, model_type: str = "qwen2_vl"
) -> Qwen2VLImageProcessorPil:
    """The image processor of `model_type` bounded to [min_pixels, max_pixels] per image.

    Qwen2-VL / Qwen2.5-VL: patch 14, merge 2, CLIP mean/std; images are resized keeping
    aspect ratio to multiples of 28 px, so an image costs (h/28)*(w/28) merged tokens, at
    most max_pixels/784. Qwen3-VL: patch 16, merge 2, mean = std = 0.5 (what its
    checkpoints ship); multiples of 32 px, (h/32)*(w/32) merged tokens.
    The PIL variant, because the default one needs torchvision (not installable beside the
    pinned torch). All of these settings are written to preprocessor_config.json by
    `save_model_dir` and read back by `checkpoint.load_model_dir`.
    """
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(MODEL_CLASSES))})")
    patch = QWEN3VL_PATCH_SIZE if model_type == "qwen3_vl" else PATCH_SIZE
    factor = patch * MERGE_SIZE
    if min_pixels < factor**2 or max_pixels < min_pixels:
        raise ValueError(f"need {factor**2} <= min_pixels <= max_pixels for {model_type}")
    extra: dict[str, Any] = {}
    if model_type == "qwen3_vl":
        extra = {"image_mean": list(QWEN3VL_IMAGE_MEAN), "image_std": list(QWEN3VL_IMAGE_STD)}
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        **extra,
    )


def check_image_processor(config: PretrainedConfig, image_processor: Any) -> None:
    """ValueError unless `image_processor` cuts images the way `config`'s vision tower expects.

    A processor with the wrong patch or merge size (say Qwen2-VL's 14 for a Qwen3-VL model)
    produces patch vectors of the wrong length or the wrong number of image tokens.
    """
    vision = config.vision_config
    for attr, want in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                       ("temporal_patch_size", vision.temporal_patch_size)):
        got = getattr(image_processor, attr, None)
        if got is not None and int(got) != int(want):
            raise ValueError(
                f"image processor has {attr}={got} but the {config.model_type} model's vision tower expects {want} "
                f"(make it with make_image_processor(model_type={config.model_type!r}))"
            )


def save_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Qwen2VLImageProcessorPil,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a complete Hugging Face model directory atomically; returns its path.

    Raises ValueError when `image_processor` does not fit the model (`check_image_processor`).

    Files: config.json, model.safetensors, generation_config.json, tokenizer files,
    preprocessor_config.json (+ `vlsi_model.json` with `metadata`). Everything is written to
    a temporary sibling directory which is then renamed into place, so readers (and a
    concurrent writer) never see a half-written model. Without `overwrite` an existing
    directory raises FileExistsError, also when another process wins the race.
    """
    check_image_processor(model.config, image_processor)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if model.generation_config is None or model.generation_config.eos_token_id is None:
            model.generation_config = generation_config_for(model.config)
        with quiet_progress_bars():
            model.save_pretrained(tmp)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if not (tmp / "model.safetensors").exists() and not (tmp / "model.safetensors.index.json").exists():
            raise RuntimeError(f"save_pretrained wrote no safetensors weights into {tmp}")
        if overwrite and out.exists():
            replace_directory(tmp, out)
        else:
            try:
                os.rename(tmp, out)  # fails if `out` appeared meanwhile (non-empty directory)
            except OSError as exc:
                raise FileExistsError(f"{out} was created by someone else while saving") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
