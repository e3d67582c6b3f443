"""The project's own "nano" model family: a Qwen2-VL student and teacher small enough for a CPU.

Why these sizes: shared/NANO_NOTES.md measured what trains on this project's 2-core CPU.
The student (text 128 x 4 layers, vision 2 x 64; ~1.3M parameters) runs a batch-32
training step in ~0.14-0.22 s and leaves chance level within minutes when trained with
the recipe in `vlsi_model.recipes.nano`. The teacher (text 256 x 8 layers, vision 4 x 128;
~9.3M parameters) is deeper *and* wider, as the VLsI setting needs (different widths and
depths, one shared tokenizer), at ~5x the student's step cost.

Both use the same family tokenizer (`nano_tokenizer`): a byte-level BPE with Qwen2-VL's
special tokens, trained offline on the synthetic-scene corpus, so teacher and student share
token ids exactly (a VLsI requirement: verbalized distributions are compared per token id).
Images are 112x112 (`nano_image_processor`): 8x8 patches of 14 px merged 2x2 into 16 image
tokens, so a VQA sample is ~40 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, Qwen2VLConfig

from vlsi_model.models import make_image_processor, tiny_qwen2vl_config

NANO_IMAGE_SIZE = 112
NANO_MIN_PIXELS = 56 * 56
NANO_MAX_PIXELS = NANO_IMAGE_SIZE * NANO_IMAGE_SIZE  # 16 merged image tokens per 112x112 image
NANO_VOCAB_SIZE = 512  # upper bound; the scene corpus saturates at fewer merges (~350-450 tokens)
NANO_CORPUS_SCENES = 2000
NANO_CORPUS_SEED = 0

# Architecture kwargs of `models.tiny_qwen2vl_config`, also usable verbatim in a YAML
# `model.from_config.architecture` section.
NANO_STUDENT_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 512,
    "vision_depth": 2,
    "vision_embed_dim": 64,
    "vision_heads": 4,
}
NANO_TEACHER_ARCH: dict[str, Any] = {
    "hidden_size": 256,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 1024,
    "vision_depth": 4,
    "vision_embed_dim": 128,
    "vision_heads": 4,
}
# Intended parameter ranges (tests check them): NANO_NOTES measured 1.30M and 9.30M.
STUDENT_PARAM_RANGE = (1.0e6, 2.0e6)
TEACHER_PARAM_RANGE = (7.0e6, 12.0e6)


def nano_student_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    """Qwen2-VL config of the nano student (~1.3M parameters) with ids read from `tokenizer`."""
    return tiny_qwen2vl_config(tokenizer=tokenizer, **NANO_STUDENT_ARCH)


def nano_teacher_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    """Qwen2-VL config of the nano teacher (~9.3M parameters): 2x wider, 2x deeper text and vision."""
    return tiny_qwen2vl_config(tokenizer=tokenizer, **NANO_TEACHER_ARCH)


def nano_image_processor() -> Any:
    """Qwen2-VL image processor bounded to 112x112 (16 merged image tokens), the family's input size."""
    return make_image_processor(min_pixels=NANO_MIN_PIXELS, max_pixels=NANO_MAX_PIXELS)


def nano_tokenizer(
    num_scenes: int = NANO_CORPUS_SCENES, seed: int = NANO_CORPUS_SEED, vocab_size: int = NANO_VOCAB_SIZE
) -> PreTrainedTokenizerBase:
    """The family tokenizer: BPE trained offline on the scene corpus, Qwen2-VL specials at ids 0..13.

    Trained on the corpus of *train* scenes (questions, answers, descriptions, captions and
    the full vocabulary line), so every word any question family uses is covered while
    test scenes are never seen. Deterministic for the same arguments.
    """
    from vlsi_model.data.question_families import corpus_texts
    from vlsi_model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_texts(num_scenes, seed=seed), vocab_size=vocab_size)


def save_nano_tokenizer(out_dir: str | Path, **kwargs: Any) -> Path:
    """Train `nano_tokenizer(**kwargs)` and save it (HF layout: tokenizer.json + tokenizer_config.json).

    Recipes then point `model.from_config.tokenizer` at this directory, so the student and
    the teacher trained later load the very same vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nano_tokenizer(**kwargs).save_pretrained(out)
    return out


def load_or_make_nano_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerBase:
    """The family tokenizer saved at `out_dir`, trained and saved there first if absent."""
    from vlsi_model.checkpoint import load_tokenizer

    out = Path(out_dir)
    if not (out / "tokenizer.json").is_file():
        save_nano_tokenizer(out)
    return load_tokenizer(out)


__all__ = [
    "NANO_IMAGE_SIZE",
    "NANO_MAX_PIXELS",
    "NANO_MIN_PIXELS",
    "NANO_STUDENT_ARCH",
    "NANO_TEACHER_ARCH",
    "NANO_VOCAB_SIZE",
    "STUDENT_PARAM_RANGE",
    "TEACHER_PARAM_RANGE",
    "load_or_make_nano_tokenizer",
    "nano_image_processor",
    "nano_student_config",
    "nano_teacher_config",
    "nano_tokenizer",
    "save_nano_tokenizer",
]
