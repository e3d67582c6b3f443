"""benchmarks/probe_representations.py: the linear probe is right on data with a known answer,
objects map to the image token that holds them, and the whole probe runs on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import probe_representations as probes  # noqa: E402

from vlsi_model.data.scenes import SceneConfig, generate_scene  # noqa: E402


def test_linear_probe_reads_a_linear_label_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=gen)
    linear = (x[:, 3] - 0.5 * x[:, 7] > 0).long()
    assert probes.fit_linear_probe(x[:400], linear[:400], x[400:], linear[400:], 2) > 0.97
    noise = torch.randint(0, 2, (600,), generator=gen)
    assert probes.fit_linear_probe(x[:400], noise[:400], x[400:], noise[400:], 2) < 0.65


def test_variance_share_is_one_for_pure_class_signal_and_small_for_a_faint_one():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    centres = torch.randn(3, 8, generator=gen)
    assert abs(probes.between_class_variance_share(centres[y], y) - 1.0) < 1e-5
    noisy = 0.1 * centres[y] + torch.randn(300, 8, generator=gen)
    assert probes.between_class_variance_share(noisy, y) < 0.05


def test_each_object_maps_to_the_token_of_its_grid_cell():
    config = SceneConfig(layout="grid")  # 112 x 112, 4 x 4 cells of 28 px = the 4 x 4 merged tokens
    grid_thw = torch.tensor([[1, 8, 8]])  # 8 x 8 patches of 14 px, merged 2 x 2
    for seed in range(20):
        scene = generate_scene(seed, config)
        cells = [int(o.y // 28) * 4 + int(o.x // 28) for o in scene.objects]
        assert probes.object_token(scene, grid_thw) == cells
        assert len(set(cells)) == len(cells)  # one object per token
    # A processor that resized to 224 x 224 (16 x 16 patches) keeps the same 4 x 4 mapping scaled.
    scaled = probes.object_token(scene, torch.tensor([[1, 16, 16]]))
    assert scaled == [int(o.y // 14) * 8 + int(o.x // 14) for o in scene.objects]


def test_probe_runs_on_a_tiny_model_and_writes_every_layer(tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.checkpoint import load_image_processor
    from vlsi_model.data.render import render_scene
    from vlsi_model.prompting import preprocess_image
    # The grid scenes reach the model as 8 x 8 patches = 4 x 4 merged tokens, one per grid cell.
    _, grid_thw = preprocess_image(load_image_processor(tiny_qwen2vl_dir),
                                   render_scene(generate_scene(0, SceneConfig(layout="grid"))))
    assert grid_thw.tolist() == [[1, 8, 8]]
    assert probes.main(["--model", str(tiny_qwen2vl_dir), "--scenes", "10", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "probes.json").read_text())
    num_layers = json.loads((tiny_qwen2vl_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert set(report["probes"]) == {"object/shape", "object/color", "object/size", "object/column", "object/row",
                                     "question/size", "question/shape", "question/color"}
    assert report["probes"]["object/column"]["classes"] == [0, 1, 2, 3]  # the 4 x 4 token grid
    for name, result in report["probes"].items():
        assert len(result["accuracy"]) == num_layers + 1, name  # vision output + every decoder layer
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"])
        assert len(result["variance_share"]) == num_layers + 1
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in result["variance_share"])
        assert result["n_test"] > 0 and result["n_train"] > result["n_test"]
    assert "| object/size |" in (tmp_path / "probes.md").read_text()
