"""`vlsi train` end to end: a loadable final model, config errors, example configs, and a
SIGKILLed run that resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlsi_model.cli import main
from vlsi_model.data.scene_dataset import write_dataset
from vlsi_model.data.scenes import SceneConfig
from vlsi_model.training.trainer import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    return write_dataset(out, 8, seed=0, config=SceneConfig(width=56, height=56), families=("caption", "count"))


def _write_config(path: Path, model: dict, data: Path, **train) -> Path:
    section = {"output_dir": str(path.parent / "unused"), "max_steps": 4, "per_device_batch_size": 2,
               "warmup_steps": 1, "lr": 3e-3, "log_every_steps": 1, "save_every_steps": 2}
    section.update(train)
    path.write_text(yaml.safe_dump({"model": model, "data": {"train": str(data), "max_length": 128},
                                    "train": section}))
    return path


def test_vlsi_train_writes_a_loadable_model(tiny_qwen2vl_dir, train_json, tmp_path, capsys):
    from vlsi_model.checkpoint import load_model_dir, read_metadata
    from vlsi_model.data.llava import load_image
    from vlsi_model.prompting import build_inputs

    cfg = _write_config(tmp_path / "sft.yaml", {"path": str(tiny_qwen2vl_dir)}, train_json, max_steps=50)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--max-steps", "3", "--output-dir", str(out)]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    model, tokenizer, processor = load_model_dir(out / "final")
    assert read_metadata(out / "final")["recipe"] == "sft"
    inputs = build_inputs(tokenizer, processor, load_image(train_json.parent / "images" / "train_000000.png"),
                          "What objects are there?")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    copy = yaml.safe_load((out / "config.yaml").read_text())
    assert copy["train"]["max_steps"] == 3 and copy["train"]["output_dir"] == str(out)  # overrides recorded
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_freeze_vision_trains_only_the_language_model(tiny_qwen2vl_dir, train_json, tmp_path):
    """`model.freeze_vision`: the vision encoder and its merger come out bit-identical, the LM does not."""
    from safetensors.torch import load_file

    cfg = _write_config(tmp_path / "sft.yaml", {"path": str(tiny_qwen2vl_dir), "freeze_vision": True}, train_json,
                        max_steps=3)
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 0
    before = load_file(str(tiny_qwen2vl_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    vision = [k for k in before if "visual." in k]
    assert any("merger" in k for k in vision)
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if "visual." not in k)


def test_vlsi_train_builds_a_fresh_small_model(train_json, tmp_path):
    from vlsi_model.checkpoint import load_model_dir

    model = {"from_config": {"family": "qwen2_5_vl", "train_tokenizer_on": "data", "vocab_size": 300,
                             "architecture": {"hidden_size": 32, "num_layers": 1, "vision_hidden_size": 32},
                             "max_pixels": 3136}}
    out = tmp_path / "fresh"
    cfg = _write_config(tmp_path / "fresh.yaml", model, train_json, output_dir=str(out), max_steps=2)
    assert main(["train", "--config", str(cfg)]) == 0
    loaded, tokenizer, _ = load_model_dir(out / "final")
    assert loaded.config.model_type == "qwen2_5_vl" and loaded.config.text_config.hidden_size == 32
    assert len(tokenizer) <= 300


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["train"].update(lerning_rate=1e-3), "unknown key lerning_rate"),
        (lambda c: c["train"].update(lr="fast"), "train.lr: expected a number"),
        (lambda c: c["data"].update(train="/nonexistent/train.json"), "data file not found"),
        (lambda c: c["model"].update(from_config={"train_tokenizer_on": "scenes"}), "exactly one of path"),
        (lambda c: c.update(extra={}), "unknown key extra"),
    ],
)
def test_bad_configs_exit_2_with_a_clear_message(tiny_qwen2vl_dir, train_json, tmp_path, capsys, mutate, message):
    path = _write_config(tmp_path / "bad.yaml", {"path": str(tiny_qwen2vl_dir)}, train_json,
                         output_dir=str(tmp_path / "out"))
    config = yaml.safe_load(path.read_text())
    mutate(config)
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1\n  max_steps: 3\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"{path}:" in capsys.readouterr().err


def test_example_configs_are_valid():
    from vlsi_model.training.sft import load_sft_config

    examples = sorted((REPO / "configs").glob("sft_*.yaml"))
    assert examples, "configs/sft_*.yaml examples are missing"
    for path in examples:
        config = load_sft_config(path)
        assert config.train.max_steps >= 1


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_qwen2vl_dir, train_json, tmp_path):
    from vlsi_model.training.sft import run_sft

    steps = 12
    killed_cfg = _write_config(tmp_path / "killed.yaml", {"path": str(tiny_qwen2vl_dir)}, train_json,
                               output_dir=str(tmp_path / "killed"), max_steps=steps, log_every_steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlsi_model.cli", "train", "--config", str(killed_cfg), "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(tmp_path / "killed") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {err.decode()[-3000:]}"
    saved = list_checkpoints(tmp_path / "killed")
    assert saved and saved[-1][0] < steps and not (tmp_path / "killed" / "final").exists()

    run_sft(killed_cfg, resume=True)
    reference = yaml.safe_load(killed_cfg.read_text())
    reference["train"]["output_dir"] = str(tmp_path / "reference")
    run_sft(reference)
    a = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    b = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    for key in b:
        assert torch.equal(a[key], b[key]), key
