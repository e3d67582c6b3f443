"""Random-weight models with real checkpoints' dimensions, built locally (the model hub is not
reachable here), for the benchmarks that need real sizes: Qwen2-VL-2B and Qwen3-VL-2B / 4B.

The dimensions are the configs in `vlsi_model/export/memory.py` (whose parameter arithmetic is
tested against models built from them on the meta device); the tokenizer is any Qwen2-VL-style
one (only its special-token ids matter), padded up to the real vocabulary size. Speed and memory
depend on the dimensions, not on the weights; answers from random weights mean nothing.
"""

from __future__ import annotations

from typing import Any

NAMES = ("qwen2_vl_2b", "qwen3_vl_2b", "qwen3_vl_4b")


def real_size_config(name: str, tokenizer: Any) -> Any:
    """The transformers config of `name` (one of NAMES) with `tokenizer`'s special-token ids."""
    from vlsi_model.export import memory
    from vlsi_model.models import tiny_qwen2vl_config, tiny_qwen3vl_config

    if name == "qwen2_vl_2b":
        return tiny_qwen2vl_config(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                   intermediate_size=8960, vision_depth=32, vision_embed_dim=1280, vision_heads=16,
                                   tie_word_embeddings=True, max_position_embeddings=32768, tokenizer=tokenizer)
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(NAMES)}")
    cfg = {"qwen3_vl_2b": memory.QWEN3_VL_2B_CONFIG, "qwen3_vl_4b": memory.QWEN3_VL_4B_CONFIG}[name]
    t, v = cfg["text_config"], cfg["vision_config"]
    return tiny_qwen3vl_config(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
        intermediate_size=t["intermediate_size"], vision_depth=v["depth"], vision_hidden_size=v["hidden_size"],
        vision_intermediate_size=v["intermediate_size"], vision_heads=v["num_heads"],
        deepstack_visual_indexes=tuple(v["deepstack_visual_indexes"]),
        num_position_embeddings=v["num_position_embeddings"], tie_word_embeddings=True, tokenizer=tokenizer)


def build_real_size_model(name: str, max_pixels: int = 448 * 448, seed: int = 0) -> tuple[Any, Any, Any]:
    """(model in eval mode, fp32; tokenizer; image processor bounded to `max_pixels`) for `name`."""
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.defaults import default_model_path
    from vlsi_model.models import build_model, make_image_processor

    _, tokenizer, _ = load_model_dir(default_model_path())  # a Qwen2-VL-style tokenizer: the ids only
    config = real_size_config(name, tokenizer)
    model = build_model(config, seed=seed).eval()
    model_type = "qwen3_vl" if name.startswith("qwen3") else "qwen2_vl"
    factor = 32 if model_type == "qwen3_vl" else 28
    processor = make_image_processor(min_pixels=(2 * factor) ** 2, max_pixels=max_pixels, model_type=model_type)
    return model, tokenizer, processor
