"""The model every command and node uses when none is given.

A trained student shipped inside the package (`vlsi_model/assets/default_student/`) wins.
Until one is shipped (or in a checkout without it), a PLACEHOLDER is built instead: a tiny
Qwen2-VL with random weights and a BPE tokenizer trained on the synthetic-scene corpus, so
the whole pipeline (ROS node, CLI, backends, export) runs end to end on any laptop with no
download. Its answers are meaningless; `default_model_is_placeholder()` lets callers say so.

The placeholder is built once per cache directory, deterministically (fixed seeds), in a
temporary directory renamed into place, so concurrent first runs (two nodes starting at
once) both end up with the same complete model and never see a partial one.
"""

from __future__ import annotations

import os
from pathlib import Path

PLACEHOLDER_NAME = "placeholder-tiny-qwen2vl-v1"
PLACEHOLDER_SEED = 0
PLACEHOLDER_CORPUS_SCENES = 300
PLACEHOLDER_VOCAB_SIZE = 512
PLACEHOLDER_MAX_PIXELS = 224 * 224


def shipped_student_path() -> Path:
    """Where a trained default student is shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default_student"


def cache_dir() -> Path:
    """`$VLSI_CACHE_DIR`, or ~/.cache/vlsi_ros."""
    env = os.environ.get("VLSI_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlsi_ros"


def placeholder_model_path() -> Path:
    return cache_dir() / "models" / PLACEHOLDER_NAME


def default_model_is_placeholder() -> bool:
    """True when no trained student is shipped, so the default model is the untrained placeholder."""
    return not (shipped_student_path() / "config.json").is_file()


def default_model_path() -> Path:
    """The shipped student if present, else the placeholder (built on first use)."""
    shipped = shipped_student_path()
    if (shipped / "config.json").is_file():
        return shipped
    path = placeholder_model_path()
    if not (path / "config.json").is_file():
        build_placeholder(path)
    return path


def build_placeholder(path: Path | None = None) -> Path:
    """Build the placeholder model directory at `path` (default: the cache) unless it exists.

    Sizes follow the small student of NANO_NOTES (text 128 x 4 layers, vision depth 2 x 64,
    ~1.3M parameters): big enough to exercise every code path, small enough to answer in a
    few milliseconds on CPU.
    """
    # Imported here: `default_model_path` is called at start-up by the CLI and the node, and
    # importing torch/transformers is only needed when the placeholder has to be built.
    from vlsi_model.data import question_families
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen2vl_config
    from vlsi_model.tokenizer import train_bpe_tokenizer

    path = Path(path) if path is not None else placeholder_model_path()
    if (path / "config.json").is_file():
        return path
    corpus = question_families.corpus_texts(PLACEHOLDER_CORPUS_SCENES, seed=PLACEHOLDER_SEED)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=PLACEHOLDER_VOCAB_SIZE)
    config = tiny_qwen2vl_config(
        tokenizer=tokenizer,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
        vision_depth=2,
        vision_embed_dim=64,
        vision_heads=4,
    )
    model = build_model(config, seed=PLACEHOLDER_SEED)
    image_processor = make_image_processor(min_pixels=56 * 56, max_pixels=PLACEHOLDER_MAX_PIXELS)
    metadata = {
        "placeholder": True,
        "name": PLACEHOLDER_NAME,
        "seed": PLACEHOLDER_SEED,
        "note": "untrained random weights: answers are meaningless; train a student with `vlsi train`/`vlsi distill`",
    }
    try:
        save_model_dir(model, tokenizer, image_processor, path, metadata=metadata)
    except FileExistsError:
        if not (path / "config.json").is_file():  # someone else's rename won, and it is complete
            raise
    return path
