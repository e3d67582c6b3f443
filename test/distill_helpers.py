"""Tiny teacher/student pairs and batches for the distillation tests (imported by test_distill_*.py).

The teacher is deeper (8 vs 4 decoder layers) and wider (64 vs 32) than the student and
has a different padded vocabulary (448 vs 416 rows), like Qwen2-VL-72B (152064) vs 2B
(151936); both share one 400-token tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch

STUDENT_VOCAB = 416
TEACHER_VOCAB = 448
STUDENT_LAYERS = 4
TEACHER_LAYERS = 8


def student_config(tokenizer: Any, model_type: str = "qwen2_vl") -> Any:
    from vlsi_model.models import tiny_qwen2vl_config, tiny_qwen25vl_config

    if model_type == "qwen2_5_vl":
        return tiny_qwen25vl_config(
            tokenizer=tokenizer, vocab_size=STUDENT_VOCAB, hidden_size=32, num_layers=STUDENT_LAYERS,
            vision_hidden_size=32,
        )
    return tiny_qwen2vl_config(
        tokenizer=tokenizer, vocab_size=STUDENT_VOCAB, hidden_size=32, num_layers=STUDENT_LAYERS, vision_embed_dim=32
    )


def teacher_config(tokenizer: Any) -> Any:
    from vlsi_model.models import tiny_qwen2vl_config

    return tiny_qwen2vl_config(tokenizer=tokenizer, vocab_size=TEACHER_VOCAB, hidden_size=64, num_layers=TEACHER_LAYERS)


def build_pair(tokenizer: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher), freshly initialised (seeded), eval mode."""
    from vlsi_model.models import build_model

    return build_model(student_config(tokenizer), seed=11), build_model(teacher_config(tokenizer), seed=12)


def make_samples(tokenizer: Any, image_processor: Any, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` synthetic-scene (image, question, answer) samples as `build_inputs` outputs."""
    from vlsi_model.data.question_families import make_questions
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import generate_scene
    from vlsi_model.prompting import build_inputs
    out = []
    i = 0
    while len(out) < n:
        scene = generate_scene(seed * 1000 + i)
        qas = make_questions(scene, seed * 1000 + i)
        qa = qas[i % len(qas)]
        out.append(build_inputs(tokenizer, image_processor, render_scene(scene), qa.question, qa.answer))
        i += 1
    return out


def make_batch(tokenizer: Any, image_processor: Any, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    from vlsi_model.prompting import collate

    return collate(make_samples(tokenizer, image_processor, n, seed), tokenizer.pad_token_id)


def random_verbalizers(hidden: int, targets: list[int], seed: int) -> Any:
    """Verbalizers with a non-zero residual branch (a freshly built one is the identity)."""
    from vlsi_model.distill.verbalizer import Verbalizers

    verbs = Verbalizers(hidden, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in verbs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return verbs
