"""benchmarks/teacher_confidence.py: the figures are right on logits with a known answer, only response
tokens count, and the whole measurement runs on a tiny model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import teacher_confidence as tc  # noqa: E402


def test_uniform_and_one_hot_teachers_and_masked_tokens():
    vocab = 8
    labels = torch.tensor([[-100, -100, 3, 5, -100]])  # positions 1, 2 predict the response tokens 3, 5
    logits = torch.zeros(1, 5, vocab)  # uniform everywhere ...
    logits[0, 2, 5] = 50.0  # ... except position 2, sure of token 5 (right)
    logits[0, 3, 1] = 50.0  # position 3 predicts no response token: must not count
    s = tc.summarise(tc.confidence_sums(logits, labels))
    assert s["response_tokens"] == 2
    assert s["mean_entropy_nats"] == pytest.approx(math.log(vocab) / 2, abs=1e-4)
    assert s["mean_cross_entropy_nats"] == pytest.approx(math.log(vocab) / 2, abs=1e-4)
    assert s["mean_top_probability"] == pytest.approx((1 / vocab + 1.0) / 2, abs=1e-4)
    assert s["share_top_probability_below_0.9"] == 0.5
    assert s["top_token_accuracy"] == 0.5  # the uniform position's argmax (token 0) is not its label (3)
    with pytest.raises(ValueError, match="no response tokens"):
        tc.summarise(tc.confidence_sums(logits, torch.full_like(labels, -100)))


def test_measure_runs_on_a_tiny_model(tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    data = write_dataset(tmp_path / "data", 6, seed=0, config=SceneConfig(width=56, height=56),
                         families=("caption", "count"))
    out = tmp_path / "confidence.json"
    assert tc.main(["--model", str(tiny_qwen2vl_dir), "--data", str(data), "--samples", "4",
                    "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 4 and result["response_tokens"] > 0
    config = json.loads((tiny_qwen2vl_dir / "config.json").read_text())
    vocab = int(config.get("vocab_size") or config["text_config"]["vocab_size"])
    assert 0.0 <= result["mean_entropy_nats"] <= math.log(vocab) + 1e-4
    assert 0.0 < result["mean_top_probability"] <= 1.0
    with pytest.raises(SystemExit):  # a missing model is a clear argparse error, not a traceback
        tc.main(["--model", str(tmp_path / "missing"), "--data", str(data)])


def test_open_form_data_reports_the_forms_entropy_bound(tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.data.open_answers import choice_entropy
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    data = write_dataset(tmp_path / "data", 6, seed=0, config=SceneConfig(width=56, height=56),
                         families=("caption", "count"), open_forms=True)
    first = tc.measure(tiny_qwen2vl_dir, data, samples=5, batch_size=2)
    records = json.loads(data.read_text())
    bound = sum(choice_entropy(r["canonical_answer"], r["family"]) for r in records[:5])
    assert first["open_forms_entropy_nats_at_most"] == pytest.approx(bound / first["response_tokens"])
    sampled = tc.measure(tiny_qwen2vl_dir, data, samples=5, batch_size=2, seed=1)
    again = tc.measure(tiny_qwen2vl_dir, data, samples=5, batch_size=2, seed=1)
    assert sampled == again and sampled["response_tokens"] != first["response_tokens"]
    plain = write_dataset(tmp_path / "plain", 3, seed=0, config=SceneConfig(width=56, height=56),
                          families=("count",))
    assert "open_forms_entropy_nats_at_most" not in tc.measure(tiny_qwen2vl_dir, plain, samples=2, batch_size=2)


def test_verbalized_layers_are_measured_and_an_identity_verbalizer_on_the_last_layer_is_the_model(
        tiny_qwen2vl_dir, tmp_path):
    """`--verbalizers`: one figure set per verbalized layer. A freshly initialised residual verb-FFN is
    the identity, so on the last decoder layer (the final norm's input) its verbalized distribution
    is the model's own: the same figures as the top level, to float rounding."""
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    from vlsi_model.distill.verbalizer import Verbalizers, save_verbalizers
    data = write_dataset(tmp_path / "data", 6, seed=0, config=SceneConfig(width=56, height=56),
                         families=("caption", "count"))
    config = json.loads((tiny_qwen2vl_dir / "config.json").read_text())
    text = config.get("text_config") or config
    last = int(text.get("num_hidden_layers") or config["num_hidden_layers"]) - 1
    verbs_dir = tmp_path / "teacher_verbalizers"
    save_verbalizers(Verbalizers(int(text.get("hidden_size") or config["hidden_size"]), [0, last]), verbs_dir,
                     model_type=config["model_type"])
    plain = tc.measure(tiny_qwen2vl_dir, data, samples=4, batch_size=2)
    result = tc.measure(tiny_qwen2vl_dir, data, samples=4, batch_size=2, verbalizers=verbs_dir)
    assert sorted(result["verbalized_layers"]) == sorted({"0", str(last)})
    for key in ("response_tokens", "mean_entropy_nats", "mean_cross_entropy_nats", "top_token_accuracy"):
        assert result[key] == pytest.approx(plain[key], rel=1e-5)  # the final layer is untouched
        assert result["verbalized_layers"][str(last)][key] == pytest.approx(plain[key], rel=1e-4)
    assert result["verbalized_layers"]["0"]["mean_cross_entropy_nats"] != pytest.approx(
        plain["mean_cross_entropy_nats"], rel=1e-3)  # layer 0 really is another distribution
    with pytest.raises(SystemExit):
        tc.main(["--model", str(tiny_qwen2vl_dir), "--data", str(data), "--verbalizers", str(tmp_path / "none")])
