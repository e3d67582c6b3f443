"""The trainer: data order, metrics, atomic checkpoints, bit-exact resume, accumulation, 2 processes.

Most tests use a toy objective (an MLP with dropout, so a resume that failed to restore the
RNG would diverge) that trains in milliseconds; the Qwen2-VL tests use the tiny conftest
model and scenes of 56x56 pixels (4 image tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlsi_model.data.scene_dataset import write_dataset
from vlsi_model.data.scenes import SceneConfig
from vlsi_model.training import trainer as trainer_mod
from vlsi_model.training.config import ConfigError, TrainConfig
from vlsi_model.training.trainer import GlobalBatchSampler, drawn_sample_indices, list_checkpoints, train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- toy objective -------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


class Toy(torch.nn.Module):
    """Regression MLP; `crash_after` forward calls it raises, like a process dying mid-run."""

    def __init__(self, init_seed: int = 0, dropout: float = 0.2, crash_after: int | None = None) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                torch.nn.Linear(16, 1),
            )
            torch.manual_seed(1234)
            self.frozen = torch.nn.Linear(6, 6)  # frozen parameters are neither optimised nor checkpointed
        self.frozen.requires_grad_(False)
        self.crash_after = crash_after
        self.calls = 0
        self.progress: list[tuple[int, int]] = []

    def set_progress(self, step: int, max_steps: int) -> None:
        self.progress.append((step, max_steps))

    def forward(self, batch):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise Crash("simulated crash")
        pred = self.net(self.frozen(batch["x"]) + batch["x"]).squeeze(-1)
        err = pred - batch["y"]
        return {"loss": (err**2).mean(), "mae": err.abs().mean()}


def toy_data(n: int = 40) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(n, 6, generator=g)
    ys = torch.sin(xs).sum(-1)
    return [{"x": x, "y": y} for x, y in zip(xs, ys, strict=True)]


def toy_collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def toy_config(out: Path, **changes) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=12, per_device_batch_size=4, grad_accum_steps=1, lr=1e-2,
                warmup_steps=2, log_every_steps=1, save_every_steps=4, keep_last_checkpoints=2)
    base.update(changes)
    return TrainConfig(**base)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- data order ----------------------------------------------------------------------------
def test_global_batches_do_not_depend_on_the_process_count():
    def global_batches(processes: int, accum: int) -> list[list[int]]:
        samplers = [GlobalBatchSampler(10, 2, accum, processes, r, seed=3, start_step=0, max_steps=7)
                    for r in range(processes)]
        steps = []
        for step in range(7):
            slots = [samplers[slot % processes].micro_batch(step, slot // processes) for slot in range(4)]
            steps.append([i for mb in slots for i in mb])
        return steps

    one = global_batches(1, 4)
    assert one == global_batches(2, 2) == global_batches(4, 1)
    stream = [i for batch in one for i in batch]  # 56 positions = 5 full epochs + 6
    for epoch in range(5):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch is its own permutation
    resumed = GlobalBatchSampler(10, 2, 4, 1, 0, seed=3, start_step=3, max_steps=7)
    assert [i for mb in resumed for i in mb] == stream[3 * 8 :]
    assert len(resumed) == 4 * 4


def test_drawn_sample_indices_are_what_a_run_reads():
    """The teacher cache is built for these: every index any process reads, and nothing else."""
    cfg = toy_config(Path("unused"), max_steps=3, per_device_batch_size=2, grad_accum_steps=2, seed=5)
    for processes in (1, 2):
        samplers = [GlobalBatchSampler(100, 2, 2, processes, r, seed=5, start_step=0, max_steps=3)
                    for r in range(processes)]
        read = sorted({i for s in samplers for mb in s for i in mb})
        assert drawn_sample_indices(cfg, 100, processes) == read
        assert len(read) == 3 * 2 * 2 * processes  # one epoch is not used up: no repeats
    assert drawn_sample_indices(cfg, 5) == [0, 1, 2, 3, 4]  # 12 positions cover a 5-sample dataset
    assert drawn_sample_indices(cfg, 100) != drawn_sample_indices(
        toy_config(Path("unused"), max_steps=3, per_device_batch_size=2, grad_accum_steps=2, seed=6), 100)


# -- toy runs ------------------------------------------------------------------------------
def test_metrics_jsonl_and_schedule(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=10, log_every_steps=3, warmup_steps=3, min_lr_ratio=0.1)
    result = train(Toy(), toy_data(), toy_collate, cfg)
    assert result.steps == 10 and result.metrics_path == tmp_path / "run" / "metrics.jsonl"
    rows = metrics(result.metrics_path)
    assert [r["step"] for r in rows] == [3, 6, 9, 10]  # every log_every_steps, and the last step
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s", "epoch", "mae"} <= set(r)
        assert r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"]) and r["mae"] > 0
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    assert rows[-1]["epoch"] == pytest.approx(10 * 4 / 40)
    assert result.final_loss == rows[-1]["loss"]

    def expected_lr(step: int) -> float:  # step is 0-based; warmup, then cosine to min_lr_ratio * lr
        if step < 3:
            return 1e-2 * step / 3
        progress = (step - 3) / (10 - 3)
        return 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    for r in rows:
        assert r["lr"] == pytest.approx(expected_lr(r["step"] - 1))


def test_crash_then_resume_is_bit_exact_with_accumulation(tmp_path):
    cfg_ref = toy_config(tmp_path / "ref", grad_accum_steps=2, log_every_steps=1)
    ref = Toy()
    train(ref, toy_data(), toy_collate, cfg_ref)

    cfg = toy_config(tmp_path / "crashed", grad_accum_steps=2, log_every_steps=1)
    with pytest.raises(Crash):  # dies in step 10 (forward call 19), after checkpoint step_8
        train(Toy(crash_after=18), toy_data(), toy_collate, cfg)
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [4, 8]

    resumed = Toy(init_seed=99)  # different init: everything must come from the checkpoint
    result = train(resumed, toy_data(), toy_collate, cfg, resume=True)
    assert result.steps == 12
    assert resumed.progress == [(s, 12) for s in range(8, 12)]
    assert_bit_equal(weights(resumed), weights(ref))
    # metrics: each step once, the resumed steps identical to the uninterrupted run's
    ref_rows, rows = metrics(tmp_path / "ref" / "metrics.jsonl"), metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    def key(r):
        return r["loss"], r["lr"], r["grad_norm"]

    assert [key(r) for r in rows] == [key(r) for r in ref_rows]
    assert result.final_loss == ref_rows[-1]["loss"]


def test_checkpoint_contents_and_retention(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=10, save_every_steps=3, keep_last_checkpoints=2)
    objective = Toy()
    result = train(objective, toy_data(), toy_collate, cfg)
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [9, 10]  # 3, 6 pruned; the end always saved
    ckpt = result.checkpoint_dir
    assert ckpt == tmp_path / "run" / "checkpoints" / "step_10"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                     "rng_state_0.json", "trainer_state.json", "config.yaml", "COMPLETE"}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # nothing pickled
    params = load_file(ckpt / "trainable.safetensors")
    assert set(params) == {n for n, p in objective.named_parameters() if p.requires_grad}
    assert_bit_equal(params, {k: v for k, v in weights(objective).items() if k in params})
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["position"] == 40 and state["config"]["max_steps"] == 10


def test_killed_checkpoint_write_is_never_resumed(tmp_path, monkeypatch):
    ref = Toy()
    train(ref, toy_data(), toy_collate, toy_config(tmp_path / "ref"))

    cfg = toy_config(tmp_path / "run")
    real_save = trainer_mod._save_tensors

    def dying_save(path, tensors):
        if path.name == "optimizer.safetensors" and "step_8" in str(path):
            path.write_bytes(b"half a file")
            raise Crash("killed while writing the step 8 checkpoint")
        real_save(path, tensors)

    monkeypatch.setattr(trainer_mod, "_save_tensors", dying_save)
    with pytest.raises(Crash):
        train(Toy(), toy_data(), toy_collate, cfg)
    monkeypatch.setattr(trainer_mod, "_save_tensors", real_save)
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp-step_8").is_dir() and not (root / "step_8").exists()
    # Hand-made debris: a step directory without its marker, and one whose file was truncated.
    (root / "step_11").mkdir()
    (root / "step_11" / "trainable.safetensors").write_bytes(b"x")
    bad = root / "step_10"
    import shutil

    shutil.copytree(root / "step_4", bad)
    (bad / "optimizer.safetensors").write_bytes(b"truncated")
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [4]

    shutil.rmtree(root / "step_11")
    shutil.rmtree(bad)
    resumed = Toy(init_seed=5)
    train(resumed, toy_data(), toy_collate, cfg, resume=True)
    assert not (root / ".tmp-step_8").exists()  # debris removed on start
    assert_bit_equal(weights(resumed), weights(ref))


def test_resume_refuses_changes_that_break_exactness(tmp_path, caplog):
    cfg = toy_config(tmp_path / "run", max_steps=8)
    train(Toy(), toy_data(), toy_collate, cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(Toy(), toy_data(), toy_collate, cfg)  # a fresh run never mixes with an old one
    for change, text in [({"max_steps": 12}, "max_steps 8 -> 12"),
                         ({"per_device_batch_size": 2}, "per_device_batch_size 4 -> 2"),
                         ({"seed": 1}, "seed 0 -> 1"), ({"lr": 0.5}, "lr 0.01 -> 0.5")]:
        with pytest.raises(ConfigError, match=text):
            train(Toy(), toy_data(), toy_collate, cfg.replace(**change), resume=True)
    with pytest.raises(ConfigError, match="dataset length 40 -> 36"):
        train(Toy(), toy_data(36), toy_collate, cfg, resume=True)
    with caplog.at_level(logging.WARNING, logger="vlsi_model.training.trainer"):
        result = train(Toy(), toy_data(), toy_collate, cfg.replace(max_steps=12), resume=True, force_resume=True)
    assert result.steps == 12 and "forced resume" in caplog.text
    # an unchanged config of a finished run resumes to a no-op
    done = train(Toy(), toy_data(), toy_collate, cfg.replace(max_steps=12), resume=True)
    assert done.steps == 12 and done.final_loss == result.final_loss


def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog):
    ref = Toy()
    train(ref, toy_data(), toy_collate, toy_config(tmp_path / "a", max_steps=5))
    again = Toy()
    with caplog.at_level(logging.WARNING, logger="vlsi_model.training.trainer"):
        train(again, toy_data(), toy_collate, toy_config(tmp_path / "b", max_steps=5), resume=True)
    assert "starting a fresh run" in caplog.text
    assert_bit_equal(weights(again), weights(ref))  # same seed: a fresh run is reproducible


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    a, b = Toy(dropout=0.0), Toy(dropout=0.0)
    ra = train(a, toy_data(), toy_collate, toy_config(tmp_path / "a", per_device_batch_size=2, grad_accum_steps=2))
    rb = train(b, toy_data(), toy_collate, toy_config(tmp_path / "b", per_device_batch_size=4, grad_accum_steps=1))
    for k, v in weights(a).items():
        torch.testing.assert_close(v, weights(b)[k], atol=1e-5, rtol=1e-5)
    assert ra.final_loss == pytest.approx(rb.final_loss, rel=1e-4)


def test_eval_dataset_is_scored_periodically(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=6, eval_every_steps=4, log_every_steps=2)
    train(Toy(), toy_data(), toy_collate, cfg, eval_dataset=toy_data(10))
    rows = metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6] and all(r["eval_mae"] > 0 for r in evals)


def test_nothing_trainable_is_an_error(tmp_path):
    toy = Toy()
    toy.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(toy, toy_data(), toy_collate, toy_config(tmp_path / "run"))


# -- tiny Qwen2-VL -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa")
    return write_dataset(out, 12, seed=0, config=SceneConfig(width=56, height=56),
                         families=("caption", "attribute", "count"))


def sft_config(model_dir: Path, data: Path, out: Path, **train) -> dict:
    section = dict(output_dir=str(out), max_steps=6, per_device_batch_size=2, lr=3e-3, warmup_steps=1,
                   log_every_steps=1, save_every_steps=3)
    section.update(train)
    return {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_length": 128}, "train": section}


def test_tiny_vlm_overfits(tiny_qwen2vl_dir, vqa_json, tmp_path):
    from vlsi_model.training.sft import run_sft

    small = tmp_path / "small.json"
    small.write_text(json.dumps([{**r, "image": str(vqa_json.parent / r["image"])}
                                 for r in json.loads(vqa_json.read_text())[:8]]))
    result = run_sft(sft_config(tiny_qwen2vl_dir, small, tmp_path / "run", max_steps=16, per_device_batch_size=4,
                                lr=1e-2, warmup_steps=2, log_every_steps=1, save_every_steps=0))
    rows = metrics(result.metrics_path)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["token_acc"] > rows[0]["token_acc"]


def test_tiny_vlm_crash_resume_bit_exact_and_gradient_checkpointing(tiny_qwen2vl_dir, vqa_json, tmp_path,
                                                                     monkeypatch):
    from vlsi_model.training.sft import SFTObjective, run_sft

    ref = run_sft(sft_config(tiny_qwen2vl_dir, vqa_json, tmp_path / "ref", gradient_checkpointing=True))
    assert ref.steps == 6

    seen_checkpointing = []
    real_forward = SFTObjective.forward

    def crashing_forward(self, batch):
        model = self.model
        on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else (
            model.is_gradient_checkpointing)
        seen_checkpointing.append(on)
        if len(seen_checkpointing) == 5:  # dies in step 5, after checkpoint step_3
            raise Crash("simulated crash")
        return real_forward(self, batch)

    monkeypatch.setattr(SFTObjective, "forward", crashing_forward)
    cfg = sft_config(tiny_qwen2vl_dir, vqa_json, tmp_path / "run", gradient_checkpointing=True)
    with pytest.raises(Crash):
        run_sft(cfg)
    assert all(seen_checkpointing)
    monkeypatch.setattr(SFTObjective, "forward", real_forward)
    run_sft(cfg, resume=True)
    assert_bit_equal(load_file(tmp_path / "run" / "final" / "model.safetensors"),
                     load_file(tmp_path / "ref" / "final" / "model.safetensors"))
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["text_config"].get("use_cache", True) is True  # checkpointing undone before saving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_qwen2vl_dir, vqa_json, tmp_path):
    """2 CPU processes (gloo, loopback) x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    import yaml

    from vlsi_model.training.sft import run_sft

    two = sft_config(tiny_qwen2vl_dir, vqa_json, tmp_path / "two", grad_accum_steps=1)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1",
           "CUDA_VISIBLE_DEVICES": ""}
    # `accelerate launch --cpu` alone uses the single-process launcher; --multi_gpu starts the
    # torchrun launcher, and ACCELERATE_USE_CPU=1 makes the processes use the CPU with gloo.
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "vlsi_model.cli", "train", "--config", str(tmp_path / "two.yaml"), "--threads", "1"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert time.time() - t0 < 240

    run_sft(sft_config(tiny_qwen2vl_dir, vqa_json, tmp_path / "one", grad_accum_steps=2))
    a = load_file(tmp_path / "two" / "final" / "model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff
    ckpt = tmp_path / "two" / "checkpoints" / "step_6"
    assert (ckpt / "rng_state_0.json").is_file() and (ckpt / "rng_state_1.json").is_file()
    two_rows, one_rows = metrics(tmp_path / "two" / "metrics.jsonl"), metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two_rows] == list(range(1, 7))  # written once, by the main process
    for r2, r1 in zip(two_rows, one_rows, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-4)
        assert r2["epoch"] == r1["epoch"]
