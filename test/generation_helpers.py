"""Hugging Face `generate` as the reference the engines' greedy tokens are compared with."""

from __future__ import annotations

import torch

from vlsi_model.prompting import build_inputs


def hf_greedy(model, tok, proc, image, question, max_new_tokens: int) -> list[int]:
    """The tokens `generate(do_sample=False)` appends to the prompt `build_inputs` lays out."""
    inputs = build_inputs(tok, proc, image, question)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
