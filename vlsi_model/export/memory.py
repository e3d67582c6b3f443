"""How much memory a Qwen2-VL / Qwen2.5-VL / Qwen3-VL deployment needs on a Jetson, computed from config numbers.

8 GB boards (Orin Nano / Orin NX 8GB) share that memory between the OS, ROS, the CPU-side
runtime and the GPU, so "does it fit?" has to be answered before building engines (a
TensorRT build that runs out of memory on a Jetson takes the whole board down). Everything
here is arithmetic on config.json values (no torch, no TensorRT), tested against the real
parameter counts of models built from the same configs.

Components, for the deployment `vlsi build-engine` produces:
- vision engine weights: patch embedding + blocks + merger;
- decoder engine weights: decoder layers + final norm + lm_head (the engine holds its own
  lm_head copy even when the checkpoint ties it to the embeddings);
- embedding table: host numpy array, memory-mapped: only rows of tokens actually used are
  paged in, so it costs almost nothing resident (listed separately, not in the total);
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per token, times the
  context, times 2 buffer sets (the runtime ping-pongs between two, see tensorrt_engine), plus a
  third of a prompt's length (a frame's shared prefix for several questions, `answer_many`);
- activations: the largest live tensors of one vision pass or one prefill (TensorRT reuses
  activation memory across layers, so the peak of one layer is what counts): attention
  scores (heads x N x N in fp32: quadratic in the image's patch count, which is why the
  image size must be bounded on 8 GB boards), MLP intermediates, hidden states, logits;
- runtime overhead: CUDA context + cuBLAS/TensorRT libraries + the Python process; an
  assumption (~0.8 GB observed on JetPack 6 Orin for TensorRT apps), overridable.
Building needs more than running: the ONNX weights (parsed into host memory), the engine
being built and the builder workspace at once; see `estimate_build_memory`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MB = 1 << 20
GB = 1 << 30
RUNTIME_OVERHEAD_BYTES = 800 * MB  # CUDA context + cuBLAS + TensorRT + Python/numpy/tokenizer (assumption)

# Published config.json numbers of Qwen/Qwen2-VL-2B-Instruct (text + vision_config).
QWEN2_VL_2B_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_vl",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


# config.json numbers of Qwen/Qwen2-VL-7B-Instruct (public; the hub is not reachable here): the
# 2B's vision tower with a 3584-wide merger output, an untied 152,064-token head.
QWEN2_VL_7B_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "vision_config": {**QWEN2_VL_2B_CONFIG["vision_config"], "hidden_size": 3584},
}

# config.json numbers of Qwen/Qwen3-VL-2B-Instruct, as several independent public repositories
# mirror them (the model hub is not reachable here); `param_counts` is checked against a model
# built from this dict on the meta device, not against the hub's parameter count.
QWEN3_VL_2B_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]},
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
}


# Qwen/Qwen3-VL-4B-Instruct: the same vision tower (merged to the wider text model), text
# 2560 x 36 layers (same sources as the 2B).
QWEN3_VL_4B_CONFIG: dict[str, Any] = {
    **QWEN3_VL_2B_CONFIG,
    "text_config": {**QWEN3_VL_2B_CONFIG["text_config"], "hidden_size": 2560, "intermediate_size": 9728,
                    "num_hidden_layers": 36, "num_attention_heads": 32},
    "vision_config": {**QWEN3_VL_2B_CONFIG["vision_config"], "out_hidden_size": 2560},
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes that decide memory, read from a config.json dict (`from_config`)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    vision_width: int  # embed_dim (qwen2_vl) / hidden_size (qwen2_5_vl)
    vision_mlp: int  # vision MLP hidden width
    vision_depth: int
    vision_heads: int
    vision_out: int  # merger output = text hidden
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    explicit_head_dim: int = 0  # Qwen3-VL gives head_dim (128 whatever the width); 0: hidden // heads
    attention_bias: bool = True  # q/k/v projection biases (Qwen2-VL, Qwen2.5-VL; not Qwen3-VL)
    position_embeddings: int = 0  # Qwen3-VL's learned vision position grid (side x side rows)
    deepstack: int = 0  # Qwen3-VL's DeepStack mergers

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDims:
        """From a Hugging Face config.json dict (flat or with `text_config`)."""
        text = {**cfg, **(cfg.get("text_config") or {})}
        v = cfg["vision_config"]
        model_type = cfg.get("model_type", "qwen2_vl")
        if model_type in ("qwen2_5_vl", "qwen3_vl"):
            width, mlp, out = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["out_hidden_size"])
        else:
            width = int(v["embed_dim"])
            mlp, out = int(width * v.get("mlp_ratio", 4)), int(v.get("hidden_size", text["hidden_size"]))
        return cls(
            model_type=model_type,
            hidden=int(text["hidden_size"]),
            intermediate=int(text["intermediate_size"]),
            layers=int(text["num_hidden_layers"]),
            heads=int(text["num_attention_heads"]),
            kv_heads=int(text["num_key_value_heads"]),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_width=width,
            vision_mlp=mlp,
            vision_depth=int(v["depth"]),
            vision_heads=int(v["num_heads"]),
            vision_out=out,
            patch_size=int(v.get("patch_size", 14)),
            merge_size=int(v.get("spatial_merge_size", 2)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            in_channels=int(v.get("in_channels", 3)),
            explicit_head_dim=int(text.get("head_dim") or 0) if model_type == "qwen3_vl" else 0,
            attention_bias=bool(text.get("attention_bias", False)) if model_type == "qwen3_vl" else True,
            position_embeddings=int(v.get("num_position_embeddings") or 0) if model_type == "qwen3_vl" else 0,
            deepstack=len(v.get("deepstack_visual_indexes") or []) if model_type == "qwen3_vl" else 0,
        )


def param_counts(d: ModelDims) -> dict[str, int]:
    """Parameters per component: vision, decoder_layers (+ final norm), embed, lm_head."""
    e = d.vision_width
    qwen3 = d.model_type == "qwen3_vl"
    patch = d.in_channels * d.temporal_patch_size * d.patch_size**2 * e + (e if qwen3 else 0)  # Conv3d (+ bias)
    attn = e * 3 * e + 3 * e + e * e + e  # qkv + proj (with biases)
    if d.model_type == "qwen2_5_vl":
        norms, mlp = 2 * e, 3 * e * d.vision_mlp + 2 * d.vision_mlp + e  # RMSNorm x2; gated MLP with biases
        merger_norm = e
    else:
        norms, mlp = 4 * e, 2 * e * d.vision_mlp + d.vision_mlp + e  # LayerNorm x2; fc1 + fc2 with biases
        merger_norm = 2 * e
    m = e * d.merge_size**2
    merger_mlp = m * m + m + m * d.vision_out + d.vision_out
    # Qwen3-VL: the learned position grid, and one DeepStack merger (LayerNorm over the 2x2 shuffle) each
    extra = d.position_embeddings * e + d.deepstack * (2 * m + merger_mlp)
    vision = patch + d.vision_depth * (norms + attn + mlp) + merger_norm + merger_mlp + extra

    h, kv, q = d.hidden, d.kv_heads * d.head_dim, d.heads * d.head_dim
    bias = int(d.attention_bias)
    layer = (h * q + bias * q) + 2 * (h * kv + bias * kv) + q * h + 3 * h * d.intermediate + 2 * h
    layer += 2 * d.head_dim if qwen3 else 0  # q_norm, k_norm
    return {"vision": vision, "decoder_layers": d.layers * layer + h, "embed": d.vocab * h, "lm_head": d.vocab * h}


def kv_bytes_per_token(d: ModelDims, dtype_bytes: int = 2) -> int:
    """KV cache per token: 2 (K, V) x layers x kv_heads x head_dim x bytes."""
    return 2 * d.layers * d.kv_heads * d.head_dim * dtype_bytes


def image_patches(height: int, width: int, d: ModelDims) -> int:
    """Vision patches of an image already resized to multiples of patch_size * merge_size."""
    return (height // d.patch_size) * (width // d.patch_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of a running deployment (`estimate_memory`)."""

    vision_weights: int
    decoder_weights: int
    embed_table_host: int  # memory-mapped; resident only for rows in use (not in total)
    kv_cache: int
    activations: int
    runtime_overhead: int
    image_tokens: int
    max_context: int

    @property
    def total(self) -> int:
        return (self.vision_weights + self.decoder_weights + self.kv_cache + self.activations
                + self.runtime_overhead)

    def as_mb(self) -> dict[str, float]:
        out = {k: round(v / MB, 1) for k, v in asdict(self).items() if k not in ("image_tokens", "max_context")}
        out["total"] = round(self.total / MB, 1)
        return out


def _activation_bytes(d: ModelDims, patches: int, prefill_tokens: int, dtype_bytes: int) -> int:
    """Peak live activations of one vision pass or one prefill, whichever is larger (see module doc)."""
    n, e = patches, d.vision_width
    vision = (d.vision_heads * n * n * 4 * 2  # scores + softmax in fp32
              + n * n * 4  # segment mask
              + n * (3 * e + d.vision_mlp + 3 * e) * dtype_bytes)  # qkv, mlp hidden, residual streams
    s, h = prefill_tokens, d.hidden
    text = (d.heads * s * s * 4 * 2  # scores + softmax in fp32
            + s * s * dtype_bytes  # attention bias input
            + s * (3 * d.intermediate + 4 * h) * dtype_bytes  # gate, up, act; residual/norm streams
            + d.vocab * 4)  # last-position logits in fp32
    return max(vision, text)


def matmul_weight_counts(d: ModelDims) -> tuple[int, int]:
    """(weights of the decoder's MatMuls incl. the lm_head, their output channels): what weight-only
    quantization (`vlsi export --quantize`) turns to INT4 / INT8; biases and norms stay float."""
    h, kv, q, inter = d.hidden, d.kv_heads * d.head_dim, d.heads * d.head_dim, d.intermediate
    weights = d.layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + d.vocab * h
    channels = d.layers * (q + 2 * kv + h + 2 * inter + h) + d.vocab
    return weights, channels


def decoder_weight_bytes(d: ModelDims, dtype_bytes: int = 2, weight_bits: int | None = None,
                         block_size: int = 128, float_lm_head: bool = True) -> int:
    """Bytes of the decoder engine's weights (layers + lm_head): float, or with the MatMul weights in
    `weight_bits` (4: one `dtype_bytes` scale per `block_size` weights; 8: one per output channel),
    the Q/DQ form of `vlsi export --quantize-format qdq`, which keeps the lm_head float."""
    p = param_counts(d)
    total = p["decoder_layers"] + p["lm_head"]
    if weight_bits is None:
        return total * dtype_bytes
    if weight_bits not in (4, 8):
        raise ValueError(f"weight_bits must be 4, 8 or None, got {weight_bits}")
    weights, channels = matmul_weight_counts(d)
    if float_lm_head:
        weights, channels = weights - d.vocab * d.hidden, channels - d.vocab
    scales = weights // block_size if weight_bits == 4 else channels
    return (total - weights) * dtype_bytes + weights * weight_bits // 8 + scales * dtype_bytes


def estimate_memory(d: ModelDims, image_hw: tuple[int, int] = (448, 448), max_context: int = 1024,
                    prefill_tokens: int | None = None, dtype_bytes: int = 2, prefix_set: bool = True,
                    runtime_overhead: int = RUNTIME_OVERHEAD_BYTES, weight_bits: int | None = None,
                    block_size: int = 128) -> MemoryEstimate:
    """Memory of the TensorRT deployment for images of `image_hw` (H, W, multiples of patch x merge) and
    `max_context` tokens (prompt + answer). `prefill_tokens` defaults to the image tokens + 64.
    `prefix_set`: the runtime's third KV set, a prompt long (engines with the extend profile).
    `weight_bits` 4 / 8: the decoder's MatMul weights quantized (`decoder_weight_bytes`)."""
    p = param_counts(d)
    patches = image_patches(*image_hw, d)
    image_tokens = patches // d.merge_size**2
    prefill = prefill_tokens if prefill_tokens is not None else image_tokens + 64
    return MemoryEstimate(
        vision_weights=p["vision"] * dtype_bytes,
        decoder_weights=decoder_weight_bytes(d, dtype_bytes, weight_bits, block_size),
        embed_table_host=p["embed"] * dtype_bytes,
        kv_cache=(2 * max_context + (prefill if prefix_set else 0)) * kv_bytes_per_token(d, dtype_bytes),
        activations=_activation_bytes(d, patches, prefill, dtype_bytes),
        runtime_overhead=runtime_overhead,
        image_tokens=image_tokens,
        max_context=max_context,
    )


def estimate_build_memory(d: ModelDims, onnx_dtype_bytes: int = 4, engine_dtype_bytes: int = 2,
                          workspace_mb: int = 2048, weight_bits: int | None = None,
                          block_size: int = 128) -> dict[str, float]:
    """Peak host+device MB while building the larger (decoder) engine: parsed ONNX weights +
    the engine's weights + builder workspace + overhead. An fp32 export doubles the first term,
    which is why 8 GB boards should build from `vlsi export --dtype fp16`; a Q/DQ export
    (`weight_bits`) holds its MatMul weights quantized in both terms."""
    parsed = decoder_weight_bytes(d, onnx_dtype_bytes, weight_bits, block_size)
    built = decoder_weight_bytes(d, engine_dtype_bytes, weight_bits, block_size)
    total = parsed + built + workspace_mb * MB + RUNTIME_OVERHEAD_BYTES
    return {"parsed_onnx_mb": round(parsed / MB, 1), "engine_mb": round(built / MB, 1),
            "workspace_mb": float(workspace_mb), "overhead_mb": round(RUNTIME_OVERHEAD_BYTES / MB, 1),
            "total_mb": round(total / MB, 1)}


def format_estimate(est: MemoryEstimate) -> str:
    """A short table of `est` in MB."""
    mb = est.as_mb()
    rows = [(k.replace("_", " "), v) for k, v in mb.items()]
    width = max(len(k) for k, _ in rows)
    head = f"image tokens {est.image_tokens}, max context {est.max_context}"
    return head + "\n" + "\n".join(f"{k:<{width}}  {v:>9.1f} MB" for k, v in rows)
