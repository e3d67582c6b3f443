"""Growing a trained model into a teacher: same function at step 0, and the new weights can learn."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny fixtures: text 64 x 2 layers, 4 heads (head_dim 16), 2 kv heads, MLP 256
DOUBLE = {"num_layers": 4, "hidden_size": 128, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 512}


def _inputs(model_dir, question: str = "What shape is the red object?", answer: str = "circle"):
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import SceneConfig, generate_scene
    from vlsi_model.prompting import build_inputs
    model, tokenizer, processor = load_model_dir(model_dir)
    image = render_scene(generate_scene(7, SceneConfig(layout="grid")))
    return model, tokenizer, processor, build_inputs(tokenizer, processor, image, question, answer)


def _max_logit_gap(a, b, inputs) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        la, lb = a(**inputs).logits, b(**inputs).logits
    return (la - lb).abs().max().item(), la.abs().max().item()


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_qwen25vl_dir"])
@pytest.mark.parametrize("plan", [DOUBLE, {"num_layers": 3}, {"intermediate_size": 300, "num_layers": 5}],
                         ids=["all-doubled", "one-more-layer", "wider-mlp-deeper"])
def test_grown_model_computes_the_source_function(request, fixture, plan):
    from vlsi_model.growth import GrowthPlan, grow_language_model

    model, _, _, inputs = _inputs(request.getfixturevalue(fixture))
    grown = grow_language_model(model, GrowthPlan(**plan))
    text = grown.config.get_text_config()
    assert text.num_hidden_layers == plan["num_layers"]
    assert text.intermediate_size == plan.get("intermediate_size", 256)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    gap, scale = _max_logit_gap(model, grown, inputs)
    assert gap < 1e-4 * max(scale, 1.0), f"grown logits differ by {gap} (scale {scale})"


def test_growth_refuses_plans_it_cannot_make_exact(tiny_qwen2vl_dir):
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.growth import GrowthPlan, grow_language_model

    model = load_model_dir(tiny_qwen2vl_dir)[0]
    with pytest.raises(ValueError, match="shrink num_layers"):
        grow_language_model(model, GrowthPlan(num_layers=1))
    with pytest.raises(ValueError, match="head_dim must stay 16"):
        grow_language_model(model, GrowthPlan(hidden_size=128))  # 4 heads of 32
    with pytest.raises(ValueError, match="num_kv_heads must stay 2"):
        grow_language_model(model, GrowthPlan(hidden_size=128, num_heads=8, num_kv_heads=2))


def test_old_layers_are_spread_between_the_new_ones():
    from vlsi_model.growth import old_layer_positions

    assert old_layer_positions(4, 8) == [0, 2, 4, 6]
    assert old_layer_positions(4, 4) == [0, 1, 2, 3]
    assert old_layer_positions(2, 5) == [0, 2]


def test_every_new_weight_learns(tiny_qwen2vl_dir):
    """Zero-initialised writers must not trap the new heads, units and layers at zero: after two
    optimiser steps every tensor of the grown language model has moved and the loss went down."""
    import torch

    from vlsi_model.growth import GrowthPlan, grow_language_model

    model, _, _, inputs = _inputs(tiny_qwen2vl_dir)
    grown = grow_language_model(model, GrowthPlan(**DOUBLE)).train()
    before = {n: p.detach().clone() for n, p in grown.named_parameters() if "language_model" in n}
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = grown(**inputs).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stuck = [n for n, p in grown.named_parameters() if n in before and torch.equal(p, before[n])
             and not n.endswith(".bias")]
    assert not stuck, f"never updated: {stuck[:5]}"
    assert losses[-1] < losses[0]


def test_grow_cli_writes_a_loadable_model_that_answers_like_the_source(tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.recipes.nano import main

    out = tmp_path / "teacher"
    assert main(["grow", "--model", str(tiny_qwen2vl_dir), "--out", str(out), "--num-layers", "4",
                 "--hidden-size", "128", "--num-heads", "8", "--num-kv-heads", "4"]) == 0
    model, _, _, inputs = _inputs(tiny_qwen2vl_dir)
    grown = load_model_dir(out)[0]
    assert grown.config.get_text_config().hidden_size == 128
    gap, scale = _max_logit_gap(model, grown, inputs)
    assert gap < 1e-4 * max(scale, 1.0)
    meta = json.loads((out / "vlsi_model.json").read_text())
    assert meta["grown_from"] == str(tiny_qwen2vl_dir)
    assert meta["growth_plan"]["num_layers"] == 4 and meta["growth_plan"]["intermediate_size"] is None


def test_growth_of_a_model_with_tied_embeddings(tiny_tokenizer, torch_threads):
    """With tie_word_embeddings the LM head is the embedding: it grows once, with zero new columns."""
    import torch

    from vlsi_model.growth import GrowthPlan, grow_language_model
    from vlsi_model.models import build_model, tiny_qwen2vl_config

    model = build_model(tiny_qwen2vl_config(tokenizer=tiny_tokenizer, tie_word_embeddings=True), seed=4)
    grown = grow_language_model(model, GrowthPlan(**DOUBLE))
    assert grown.lm_head.weight.data_ptr() == grown.model.language_model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[20, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        gap = (model(input_ids=ids).logits - grown(input_ids=ids).logits).abs().max().item()
    assert gap < 1e-4
