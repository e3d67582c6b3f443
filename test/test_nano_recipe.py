"""The nano recipe end to end on a tiny model: train with a frozen vision tower (which then
really stays at its init), export a mid-run checkpoint, evaluate, and ship with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vlsi_model.data.scene_dataset import write_dataset
from vlsi_model.data.scenes import SceneConfig
from vlsi_model.recipes.nano import main as recipe_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_run_state(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture) -> None:
    """`nano state` (what the reproduction script skips stages by) on the finished run of `config`."""
    def state(edit: dict) -> tuple[int, str]:
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump({**config, "train": {**config["train"], **edit}}))
        capsys.readouterr()
        rc = recipe_main(["state", "--config", str(path)])
        out = capsys.readouterr()
        return rc, out.out + out.err

    assert state({}) == (0, "done\n")
    assert state({"log_every_steps": 7, "save_every_steps": 0}) == (0, "done\n")  # bookkeeping only
    rc, text = state({"max_steps": 3, "lr": 5e-4})  # edited after training: never silently reused
    assert rc == 3 and "train.max_steps: 2 -> 3" in text and "train.lr: 0.001 -> 0.0005" in text
    assert state({"output_dir": str(tmp_path / "elsewhere")}) == (0, "todo\n")


def test_train_export_eval_ship(tmp_path, tiny_tokenizer, capsys):
    cfg_scenes = SceneConfig(width=56, height=56, max_objects=3)
    train = write_dataset(tmp_path / "data", 6, seed=0, config=cfg_scenes, families=("caption", "exist"))
    test = write_dataset(tmp_path / "data", 3, seed=0, split="test", config=cfg_scenes, families=("exist",))
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    config = {
        "model": {"from_config": {"family": "qwen2_vl", "seed": 0, "tokenizer": str(tok_dir),
                                  "architecture": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                                   "num_kv_heads": 1, "vision_embed_dim": 32, "vision_heads": 2},
                                  "max_pixels": 56 * 56}},
        "data": {"train": str(train), "max_length": 96},
        "nano": {"freeze_vision_tower": True},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_batch_size": 2,
                  "warmup_steps": 1, "save_every_steps": 1, "log_every_steps": 1},
    }
    cfg_path = tmp_path / "nano.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert recipe_main(["train", "--config", str(cfg_path), "--threads", "1"]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file()
    _check_run_state(tmp_path, config, capsys)

    # Frozen: the vision blocks equal a freshly built model's, the merger changed.
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.recipes.nano import build_model_and_processors, load_nano_config

    fresh, _, _ = build_model_and_processors(load_nano_config(cfg_path).sft())
    trained = load_model_dir(final)[0].state_dict()
    ref = fresh.state_dict()
    block = next(k for k in trained if "visual.blocks." in k and k.endswith("weight"))
    merger = next(k for k in trained if "visual.merger." in k and k.endswith("weight"))
    assert torch.equal(trained[block], ref[block])
    assert not torch.equal(trained[merger], ref[merger])

    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    assert recipe_main(["export", "--config", str(cfg_path), "--checkpoint", str(ckpt), "--out",
                        str(tmp_path / "exported")]) == 0
    exported = load_model_dir(tmp_path / "exported")[0].state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)

    from vlsi_model.evaluation import evaluate, write_results

    results = write_results(evaluate(final, test), tmp_path / "results.json")
    dest = tmp_path / "pkg" / "default_student"
    assert recipe_main(["ship", "--model", str(final), "--results", str(results), "--metrics",
                        str(tmp_path / "run" / "metrics.jsonl"), "--config", str(cfg_path), "--dest", str(dest),
                        "--camera-results", str(results), "--extra-results", "Where is it? (locate)",
                        str(results)]) == 0
    card = (dest / "README.md").read_text()
    assert "On the synthetic camera's frames" in card
    # Tables: test split, its templates, camera, the extra section and its templates.
    assert "## Where is it? (locate)\n\n| family |" in card and card.count("| exist |") == 5
    assert json.loads((dest / "where_is_it_locate_results.json").read_text())["overall"] == \
        json.loads(results.read_text())["overall"]
    assert "predictions" not in json.loads((dest / "camera_results.json").read_text())
    assert "| exist |" in card and "2 steps" in card and "vision encoder stays at its random" in card
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    assert "predictions" not in json.loads((dest / "test_results.json").read_text())
    load_model_dir(Path(dest))


def test_model_card_of_a_distilled_student(tmp_path, tiny_qwen2vl_dir):
    """A VLsI-distilled student's card names the teacher, the three steps with their lengths and
    the step-3 loss, read from the distill run's own config and metrics."""
    from vlsi_model.recipes.nano import model_card

    run = tmp_path / "distill"
    (run / "runs" / "sft").mkdir(parents=True)
    (run / "runs" / "sft" / "metrics.jsonl").write_text(
        json.dumps({"step": 7, "loss": 0.25, "token_acc": 0.875, "elapsed_s": 120.0}) + "\n")
    config = run / "distill_config.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"path": "runs/nano/teacher/final"}, "student": {"path": "runs/nano/student/final"},
        "matching": {"variant": "full"}, "loss": {"intermediate_op": "kld", "last_op": "kld"},
        "train": {"per_device_batch_size": 32, "lr": 5e-4},
        "steps": {"verbalize": {"max_steps": 11}, "interact": {"max_steps": 13}, "sft": {"max_steps": 7}}}))
    results = {"families": {"count": {"n": 4, "accuracy": 0.5, "prior": 0.25, "majority_answer": "1"}},
               "overall": {"n": 4, "accuracy": 0.5}}
    card = model_card(Path(tiny_qwen2vl_dir), results, tmp_path / "unused.jsonl", config)
    flat = " ".join(card.split())
    assert "VLsI-distilled from a larger teacher" in flat and "runs/nano/teacher/final" in flat
    assert "verbalization 11 steps" in flat and "interaction 13 steps" in flat and "step 3 SFT 7 steps" in flat
    assert "sft 2.0 min" in flat and "loss 0.2500" in flat and "accuracy 0.875" in flat
    assert "| count | 4 | 0.500 |" in card
    assert "vlsi distill --config configs/nano/distill_student.yaml" in card  # the reproduction, distill included


def test_model_card_of_a_student_trained_in_two_stages(tmp_path, tiny_qwen2vl_dir):
    """A second-stage student's card says where each stage started and on what data, and adds
    the table of the camera's frames next to the test split's."""
    from vlsi_model.recipes.nano import model_card

    first, second = tmp_path / "student.yaml", tmp_path / "student_grids.yaml"
    first.write_text(yaml.safe_dump({"nano": {"freeze_vision_tower": True, "freeze_vision_merger": True}}))
    second.write_text(yaml.safe_dump({
        "model": {"path": "runs/nano/student/final"}, "data": {"train": "runs/nano/data_4x3/train_mix_both.json"},
        "nano": {"freeze_vision_tower": True, "freeze_vision_merger": True},
        "train": {"per_device_batch_size": 32, "lr": 3e-4, "min_lr_ratio": 0.1, "warmup_steps": 50}}))
    (tmp_path / "m1.jsonl").write_text(json.dumps({"step": 12000, "loss": 0.2, "token_acc": 0.9}) + "\n")
    (tmp_path / "m2.jsonl").write_text(json.dumps({"step": 1500, "loss": 0.1, "token_acc": 0.95}) + "\n")

    def results(acc: float) -> dict:
        return {"families": {"count": {"n": 4, "accuracy": acc, "prior": 0.25, "majority_answer": "1"}},
                "overall": {"n": 4, "accuracy": acc}}

    card = model_card(Path(tiny_qwen2vl_dir), results(0.5), tmp_path / "m2.jsonl", second,
                      earlier_stages=[(tmp_path / "m1.jsonl", first)], camera_results=results(0.75))
    flat = " ".join(card.split())
    assert flat.index("12000 steps of batch 32") < flat.index("1500 more steps from `runs/nano/student/final`")
    assert "train_mix_both.json" in flat and "lr 0.0003" in flat and "cosine to 3e-05" in flat
    assert "| count | 4 | 0.500 |" in card and "| count | 4 | 0.750 |" in card
    assert card.index("| count | 4 | 0.500 |") < card.index("On the synthetic camera's frames") < card.index("0.750")
    assert "--config configs/nano/student_grids.yaml" in card  # the reproduction includes the second stage
    assert "its last stage also on the synthetic camera's 640x480 frames" in flat


def test_model_card_of_a_qwen3vl_student_names_its_family_and_geometry(tmp_path, tiny_qwen2vl_dir,
                                                                         tiny_qwen3vl_dir):
    """`FAMILY=qwen3 scripts/train_default_student.sh` ships a Qwen3-VL student: its card names that
    family, its Hugging Face class, its 32-px image tokens (128x128 frames, 128x96 camera frames) and
    the command that reproduces it; a Qwen2-VL student's card keeps its own (28 px, 112x112)."""
    from vlsi_model.recipes.nano import model_card

    config = tmp_path / "qwen3_student.yaml"
    config.write_text(yaml.safe_dump({"nano": {"freeze_vision_tower": True, "freeze_vision_merger": True},
                                      "train": {"per_device_batch_size": 32, "lr": 1e-3}}))
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 12000, "loss": 0.2, "token_acc": 0.9}) + "\n")
    results = {"families": {"count": {"n": 4, "accuracy": 0.5, "prior": 0.25, "majority_answer": "1"}},
               "overall": {"n": 4, "accuracy": 0.5}}
    qwen3 = " ".join(model_card(Path(tiny_qwen3vl_dir), results, tmp_path / "m.jsonl", config,
                                camera_results=results).split())
    assert "Qwen3-VL" in qwen3 and "Qwen3VLForConditionalGeneration.from_pretrained" in qwen3
    assert "128x128" in qwen3 and "128x96 = 4x3 image tokens" in qwen3 and "112x112" not in qwen3
    assert "FAMILY=qwen3 scripts/train_default_student.sh" in qwen3
    qwen2 = " ".join(model_card(Path(tiny_qwen2vl_dir), results, tmp_path / "m.jsonl", config,
                                camera_results=results).split())
    assert "Qwen2VLForConditionalGeneration" in qwen2 and "112x84 = 4x3 image tokens" in qwen2
    assert "FAMILY=qwen3" not in qwen2


def test_freezing_the_merger_alone_is_refused(tmp_path):
    """A trained tower behind a frozen random projector was never measured: a clear error, before any work."""
    from vlsi_model.recipes.nano import load_nano_config

    config = {"model": {"from_config": {"family": "qwen2_vl", "tokenizer": str(tmp_path / "tok")}},
              "data": {"train": str(tmp_path / "none.json")},
              "nano": {"freeze_vision_merger": True}, "train": {"output_dir": str(tmp_path / "run")}}
    with pytest.raises(ValueError, match="freeze_vision_merger needs nano.freeze_vision_tower"):
        load_nano_config(config)
    assert not (tmp_path / "run").exists()
