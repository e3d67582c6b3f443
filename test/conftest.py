"""Shared fixtures: tiny Qwen2-VL / Qwen2.5-VL model directories built locally (no model hub).

Models are random-weight and tiny (~0.4M parameters, images capped at 112x112 = 16 image
tokens) so that every test that needs a real model runs in milliseconds per answer on CPU.
torch is imported inside the fixtures so test modules that never use a model stay cheap.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest


def _prefer_the_installed_vlsi_ros() -> None:
    """`python -m pytest` puts the working directory first on sys.path; from the repository root
    that is the source `vlsi_ros/`, which lacks the interfaces colcon generates (msg, srv,
    action) into the installed package. Drop that entry so the installed package is imported
    (the ML library resolves to the same source through its editable install either way)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "vlsi_ros" / "srv").is_dir():
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != repo]


_prefer_the_installed_vlsi_ros()

TEST_THREADS = 2  # the CI/dev machines have 2 shared cores
TINY_MAX_PIXELS = 112 * 112


@pytest.fixture
def fake_trt(monkeypatch):
    """The builder run against test/fake_tensorrt.py (the TensorRT 10 API surface it calls), on an
    Orin without DLA cores."""
    import fake_tensorrt

    from vlsi_model.export import tensorrt_build

    monkeypatch.setattr(tensorrt_build, "load_tensorrt", lambda: fake_tensorrt)
    monkeypatch.setattr(tensorrt_build, "gpu_info", lambda: dict(fake_tensorrt.ORIN_GPU))
    monkeypatch.setattr(fake_tensorrt.Builder, "num_DLA_cores", 0)
    return fake_tensorrt


@pytest.fixture(scope="session")
def torch_threads() -> int:
    """Limit torch to TEST_THREADS intra-op threads for the whole session."""
    import torch

    torch.set_num_threads(TEST_THREADS)
    return TEST_THREADS


@pytest.fixture(scope="module")
def one_torch_thread(torch_threads):
    """One intra-op thread for a module of tiny ops (`pytestmark = usefixtures(...)`): on the test
    machines' 2 shared cores more threads only add contention; restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer with Qwen2-VL's specials trained on the synthetic-scene corpus."""
    from vlsi_model.data.question_families import corpus_texts
    from vlsi_model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_texts(60, seed=0), vocab_size=400)


def _build_dir(root: Path, config_factory, tokenizer, seed: int) -> Path:
    from vlsi_model.models import build_model, make_image_processor, save_model_dir

    model = build_model(config_factory(tokenizer=tokenizer), seed=seed)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=TINY_MAX_PIXELS)
    return save_model_dir(model, tokenizer, processor, root / "model", metadata={"placeholder": False, "test": True})


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory, tiny_tokenizer, torch_threads) -> Path:
    """Directory of a tiny random Qwen2-VL (text 64 x 2 layers, vision depth 2), HF layout."""
    from vlsi_model.models import tiny_qwen2vl_config

    return _build_dir(tmp_path_factory.mktemp("tiny_qwen2vl"), tiny_qwen2vl_config, tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tmp_path_factory, tiny_tokenizer, torch_threads) -> Path:
    """Directory of a tiny random Qwen2.5-VL (windowed + full-attention vision blocks), HF layout."""
    from vlsi_model.models import tiny_qwen25vl_config

    return _build_dir(tmp_path_factory.mktemp("tiny_qwen25vl"), tiny_qwen25vl_config, tiny_tokenizer, seed=2)


@pytest.fixture(scope="session")
def tiny_qwen3vl_dir(tmp_path_factory, tiny_tokenizer, torch_threads) -> Path:
    """Directory of a tiny random Qwen3-VL (text 64 x 3 layers, DeepStack into the first 2, 16 px
    patches), HF layout."""
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen3vl_config

    model = build_model(tiny_qwen3vl_config(tokenizer=tiny_tokenizer, num_layers=3), seed=5)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112, model_type="qwen3_vl")
    return save_model_dir(model, tiny_tokenizer, processor, tmp_path_factory.mktemp("tiny_qwen3vl") / "model",
                          metadata={"placeholder": False, "test": True})


@pytest.fixture(scope="session")
def yes_model_dir(tmp_path_factory, tiny_tokenizer, torch_threads) -> Path:
    """A tiny Qwen2-VL trained in the fixture to answer "yes" to anything.

    Alert topics publish only on a yes; a random-weight model never says it, so the alert
    path needs a model whose answer is known. A few dozen real optimiser steps suffice.
    """
    import torch

    from vlsi_model.data.question_families import make_questions
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import SceneConfig, generate_scene
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen2vl_config
    from vlsi_model.prompting import build_inputs, collate
    model = build_model(tiny_qwen2vl_config(tokenizer=tiny_tokenizer), seed=3)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=TINY_MAX_PIXELS)
    samples = []
    for seed in range(8):
        scene = generate_scene(seed, SceneConfig(width=96, height=80))
        for qa in make_questions(scene, seed)[:3]:
            samples.append(build_inputs(tiny_tokenizer, processor, render_scene(scene), qa.question, "yes"))
    batch = collate(samples, tiny_tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    return save_model_dir(model, tiny_tokenizer, processor, tmp_path_factory.mktemp("yes_model") / "model",
                          metadata={"placeholder": False, "test": True, "trained_to_answer": "yes"})


@pytest.fixture(autouse=True)
def project_logs_reach_caplog():
    """Make the project's loggers propagate to the root logger, where `caplog` listens.

    Under `colcon test` on a ROS install, launch_testing's and launch_pytest's pytest plugins
    import `launch`, whose logging setup makes every logger created afterwards a non-propagating
    `LaunchLogger` (launch/logging/__init__.py: LaunchLogger.__init__, reset() on import): the
    project's module loggers then never reach caplog (9 tests failed with pytest < 9.1, which
    is what Ubuntu's ROS installs run). Setting propagate back is what a plain Python logger has."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] in ("vlsi_model", "vlsi_ros") and isinstance(logger, logging.Logger):
            logger.propagate = True


@pytest.fixture(autouse=True)
def fresh_trace_budget():
    """Each test starts with a fresh process's budget of traced torch engines (see
    torch_engine.MAX_TRACED_ENGINES_PER_PROCESS): the suite creates far more engines in one
    process than a server does, and a test must not depend on how many ran before it."""
    module = sys.modules.get("vlsi_model.engine.torch_engine")
    if module is not None:
        module._traced_engines = 0


@pytest.fixture(scope="session")
def ros_context():
    """rclpy initialised once per test session, discovery kept on this machine.

    The domain id is random per session unless the environment sets one, so test runs that
    share the machine (parallel sessions, CI) never see each other's nodes. It is set at
    import time below so node processes started by tests inherit it.
    """
    import rclpy

    rclpy.init()
    yield rclpy.get_default_context()
    rclpy.try_shutdown()


def _isolate_ros_discovery() -> None:
    import os
    import random

    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")


_isolate_ros_discovery()
