"""Function-preserving growth of a trained Qwen2-VL / Qwen2.5-VL language model: deeper and wider.

Why: VLsI needs a teacher that is larger *and better* than its student. On this project's
2-core CPU a teacher trained from scratch at 7x the student's size learns more slowly per step
than the student and, after 12000 steps (4.5 h), still scores below it (0.749 vs 0.787 on the
nano test split). Growing a trained model into the teacher's shape starts the teacher where the
student ends, so every further step of training makes it a better model than the student, at
the teacher's size (the Net2Net idea; bert2BERT and LiGO grow transformers the same way).

The grown model computes exactly the same function as the source (up to float rounding):

* wider residual stream (hidden_size D -> kD): new dimensions start at zero and nothing writes
  into them yet (new rows of every matrix that writes into the residual stream, and the new
  columns of the token embedding and of the merger's output, are zero). RMSNorm divides by
  the mean over all dimensions, which the zeros shrink by k; the norm weights are scaled by
  1/sqrt(k) and the epsilon by 1/k so the normalised values are unchanged.
* more attention heads (same head_dim, same query/key-value ratio, so every old head keeps its
  key-value head) and wider MLPs: the new heads' and units' outputs enter the residual stream
  through zero columns of o_proj / down_proj.
* more layers: new layers are inserted between the old ones with zero o_proj and down_proj,
  so each adds nothing to the residual stream: an identity.

Every other new weight keeps the fresh model's random initialisation: it reads the (zero) new
dimensions or feeds a zero output, so it changes nothing now and breaks the symmetry between
new units once training moves the zeros. The vision encoder is copied unchanged (only the
merger's output widens), so teacher and student read images with the same frozen encoder, as
the paper's Qwen2-VL teachers and students share their vision encoder design.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from vlsi_model.checkpoint import load_model_dir
from vlsi_model.models import build_model, save_model_dir


@dataclass(frozen=True)
class GrowthPlan:
    """Target sizes of the language model; None keeps the source's value."""

    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None


# GrowthPlan field -> the text config's attribute of the same size.
_CONFIG_NAMES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}


def _check_plan(text: Any, plan: GrowthPlan) -> tuple[int, ...]:
    old = tuple(int(getattr(text, attr)) for attr in _CONFIG_NAMES.values())
    new = tuple(int(getattr(text, attr)) if getattr(plan, field) is None else int(getattr(plan, field))
                for field, attr in _CONFIG_NAMES.items())
    for field, o, n in zip(_CONFIG_NAMES, old, new, strict=True):
        if n < o:
            raise ValueError(f"growth cannot shrink {field}: {o} -> {n}")
    layers, hidden, heads, kv_heads, _ = new
    if hidden % heads or hidden // heads != old[1] // old[2]:
        raise ValueError(f"head_dim must stay {old[1] // old[2]} (hidden_size {hidden} / num_heads {heads}): "
                         "rotary sections and attention scale depend on it")
    if heads % kv_heads or heads // kv_heads != old[2] // old[3]:
        raise ValueError(f"num_heads / num_kv_heads must stay {old[2] // old[3]} so every old query head keeps "
                         f"its key-value head (got {heads} / {kv_heads})")
    return new


def old_layer_positions(old_layers: int, new_layers: int) -> list[int]:
    """Index in the grown model of each source layer, spread evenly (identity layers fill the gaps).

    4 -> 8 gives [0, 2, 4, 6]: each trained layer is followed by a new one, so the new depth is
    spread over the network rather than stacked at one end.
    """
    return [i * new_layers // old_layers for i in range(old_layers)]


def _copy_block(dst: torch.Tensor, src: torch.Tensor, zero_rest: bool) -> None:
    """Write `src` into the leading block of `dst`; zero the rest of `dst` if asked."""
    if zero_rest:
        dst.zero_()
    dst[tuple(slice(0, s) for s in src.shape)] = src


def _grow_norm(dst: torch.Tensor, src: torch.Tensor | None, scale: float) -> None:
    """RMSNorm weight for the wider stream: old weights x scale, new dimensions at their mean."""
    if src is None:
        dst.fill_(scale)
        return
    dst[: src.shape[0]] = src * scale
    dst[src.shape[0]:] = src.mean() * scale


GROWABLE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def grow_language_model(model: PreTrainedModel, plan: GrowthPlan, seed: int = 0) -> PreTrainedModel:
    """A new model of the grown size computing the same function as `model` (see the module doc).

    Raises ValueError for a plan that would shrink a size, change head_dim or change the
    query/key-value head ratio, and for Qwen3-VL (not supported yet: its DeepStack mergers, q/k
    norms and explicit head_dim are not grown). The source model is not modified.
    """
    if model.config.model_type not in GROWABLE_MODEL_TYPES:
        raise ValueError(f"growing a {model.config.model_type} model is not supported yet "
                         f"(supported: {', '.join(GROWABLE_MODEL_TYPES)})")
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    old_layers, old_hidden = text.num_hidden_layers, text.hidden_size
    layers, hidden, heads, kv_heads, intermediate = _check_plan(text, plan)
    k = hidden / old_hidden
    text.num_hidden_layers, text.hidden_size = layers, hidden
    text.num_attention_heads, text.num_key_value_heads, text.intermediate_size = heads, kv_heads, intermediate
    text.rms_norm_eps = text.rms_norm_eps / k
    positions = old_layer_positions(old_layers, layers)
    if getattr(text, "layer_types", None) is not None:  # a new layer attends like the source layer before it
        old_types = list(text.layer_types)
        text.layer_types = [old_types[max(o for o, p in enumerate(positions) if p <= i)] for i in range(layers)]
    vision = config.vision_config
    if hasattr(vision, "out_hidden_size"):  # Qwen2.5-VL: the merger's output width
        vision.out_hidden_size = hidden
    else:  # Qwen2-VL
        vision.hidden_size = hidden
    grown = build_model(config, seed=seed)
    grown.generation_config = copy.deepcopy(model.generation_config)

    # state_dict() tensors share storage with the parameters: writing into them grows the model in place.
    src, dst = model.state_dict(), grown.state_dict()
    scale = 1.0 / math.sqrt(k)
    source_of = {new: old for old, new in enumerate(positions)}
    prefix = "model.language_model.layers."
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, tensor in dst.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix):].split(".", 1)
                old = source_of.get(int(index))
                source = None if old is None else src[f"{prefix}{old}.{rest}"]
                writes_residual = rest.endswith(("o_proj.weight", "down_proj.weight"))
                if rest.endswith("layernorm.weight"):
                    _grow_norm(tensor, source, scale)
                elif source is not None:
                    _copy_block(tensor, source, zero_rest=writes_residual or rest.endswith(".bias"))
                elif writes_residual:
                    tensor.zero_()  # a new layer adds nothing yet: identity
            elif name == "model.language_model.norm.weight":
                _grow_norm(tensor, src[name], scale)
            elif name == "model.language_model.embed_tokens.weight" or name.startswith("model.visual.merger.mlp.2."):
                _copy_block(tensor, src[name], zero_rest=True)  # nothing enters the new dimensions
            elif name == "lm_head.weight" and tied:
                continue  # the embedding's tensor, already grown
            else:
                _copy_block(tensor, src[name], zero_rest=False)
    return grown.eval()


def grow_model_dir(model_dir: str | Path, out_dir: str | Path, plan: GrowthPlan, seed: int = 0) -> Path:
    """Grow the model in `model_dir` and save it (with its tokenizer and image processor) to `out_dir`.

    The metadata records the source and the plan, so a teacher grown from a student says so.
    """
    model, tokenizer, image_processor = load_model_dir(model_dir)
    grown = grow_language_model(model, plan, seed=seed)
    return save_model_dir(grown, tokenizer, image_processor, out_dir, overwrite=True,
                          metadata={"placeholder": False, "grown_from": str(model_dir), "growth_seed": seed,
                                    "growth_plan": dataclasses.asdict(plan)})
