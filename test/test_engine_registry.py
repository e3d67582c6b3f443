"""load_engine's backend selection: "auto" sees engine_dir, falls back with the reason logged and
drops options the chosen backend does not take; an explicit backend refuses them. Real ONNX exports
of the tiny Qwen2-VL; TensorRT (absent here) through its availability check and a stand-in loader."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
from onnx_helpers import export_once

import vlsi_model.engine as registry
from vlsi_model.engine import (
    AUTO_ORDER,
    available_backends,
    backend_names,
    backend_options,
    load_engine,
    unavailable_reasons,
)
from vlsi_model.engine.base import EngineError, ModelLoadError
from vlsi_model.engine.tensorrt_engine import ENGINE_FORMAT, ENGINE_MANIFEST, EngineMismatchError

LOGGER = "vlsi_model.engine"


@pytest.fixture(scope="module")
def export_dir(tiny_qwen2vl_dir):
    return export_once(tiny_qwen2vl_dir)


@pytest.fixture
def model_copy(tiny_qwen2vl_dir, tmp_path):
    """The tiny model alone (no export next to it)."""
    return shutil.copytree(tiny_qwen2vl_dir, tmp_path / "model")


def fake_engine_dir(path, export_dir):
    """A directory `find_engine_dir` accepts (engine manifest + the export's files, as
    `vlsi build-engine` leaves it); the engines themselves are never read here."""
    shutil.copytree(export_dir, path)
    (path / ENGINE_MANIFEST).write_text(json.dumps({"format": ENGINE_FORMAT, "format_version": 1}))
    return path


def answer_ok(engine) -> bool:
    return engine.answer(np.zeros((40, 50, 3), np.uint8), "How many objects?", max_new_tokens=2).num_tokens >= 1


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)


# ------------------------------------------------------------------------------ availability
def test_availability_sees_engine_dir(model_copy, export_dir, tmp_path):
    assert available_backends(model_copy) == ["torch"]
    assert available_backends(model_copy, engine_dir=export_dir) == ["onnxruntime", "torch"]
    assert available_backends(model_copy, engine_dir=tmp_path / "nothing") == ["torch"]
    why = unavailable_reasons(model_copy, engine_dir=tmp_path / "nothing")
    assert list(why) == list(AUTO_ORDER) and why["torch"] is None
    assert "no ONNX export in" in why["onnxruntime"] and str(tmp_path / "nothing") in why["onnxruntime"]
    assert "no TensorRT engines" in why["tensorrt"]
    # engine_dir "" (an unset ROS parameter) is "not given", not the working directory
    assert available_backends(model_copy, engine_dir="") == ["torch"]


def test_tensorrt_availability_needs_engines_tensorrt_and_cuda(model_copy, export_dir, tmp_path, monkeypatch):
    engines = fake_engine_dir(tmp_path / "engines", export_dir)
    why = unavailable_reasons(model_copy, "cuda", engine_dir=engines)["tensorrt"]
    if not registry._trt.tensorrt_available():
        assert "TensorRT is not installed" in why
    monkeypatch.setattr(registry._trt, "tensorrt_available", lambda: True)
    assert available_backends(model_copy, "cuda", engine_dir=engines)[0] == "tensorrt"
    assert "device is 'cpu'" in unavailable_reasons(model_copy, "cpu", engine_dir=engines)["tensorrt"]
    # the engine directory carries the export too: onnxruntime can serve it on the CPU
    assert available_backends(model_copy, "cpu", engine_dir=engines) == ["onnxruntime", "torch"]
    # next to the model: <model>/tensorrt
    assert "tensorrt" not in available_backends(model_copy, "cuda")
    shutil.copytree(engines, model_copy / "tensorrt")
    assert available_backends(model_copy, "cuda")[0] == "tensorrt"


# ------------------------------------------------------------------------------ auto
def test_auto_uses_the_export_in_engine_dir_with_its_options(model_copy, export_dir, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = load_engine(model_copy, engine_dir=export_dir, num_threads=1, max_question_chars=200)
    try:
        assert engine.backend == "onnxruntime" and engine.max_question_chars == 200 and answer_ok(engine)
        assert engine.export_dir == export_dir
    finally:
        engine.close()
    assert "using onnxruntime" in messages(caplog)


def test_auto_finds_the_export_next_to_the_model(model_copy, export_dir, caplog):
    shutil.copytree(export_dir, model_copy / "onnx")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = load_engine(model_copy, dtype="float32", num_threads=1)  # dtype: torch only
    try:
        assert engine.backend == "onnxruntime" and answer_ok(engine)
    finally:
        engine.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert any("does not use option(s) dtype" in m for m in warnings)


def test_auto_falls_back_to_torch_when_engine_dir_has_no_export(model_copy, tmp_path, caplog):
    empty = tmp_path / "no_export"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = load_engine(model_copy, engine_dir=empty, num_threads=1, dtype="float32")
    try:
        assert engine.backend == "torch" and answer_ok(engine)
    finally:
        engine.close()
    text = messages(caplog)
    assert "using torch" in text and "does not use option(s) engine_dir" in text
    assert f"no ONNX export in {empty}" in text  # the reason it fell back


def test_auto_falls_back_when_the_chosen_backend_cannot_load(model_copy, export_dir, tmp_path, monkeypatch, caplog):
    """Engines built for another GPU: auto warns and serves the export copied beside them."""
    engines = fake_engine_dir(tmp_path / "engines", export_dir)

    def mismatch(model_path, device="cuda", engine_dir=None, max_question_chars=None, is_placeholder=None):
        raise EngineMismatchError(f"{engine_dir}: built for another GPU")

    monkeypatch.setitem(registry._BACKENDS, "tensorrt",
                        registry._Backend(unavailable=lambda path, device, options: None, load=mismatch))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = load_engine(model_copy, engine_dir=engines, num_threads=1)
    try:
        assert engine.backend == "onnxruntime" and answer_ok(engine)
    finally:
        engine.close()
    assert "tensorrt could not load" in messages(caplog) and "another GPU" in messages(caplog)


def test_auto_reports_every_failure_when_nothing_loads(tmp_path, monkeypatch):
    def broken(name):
        def load(model_path, device="cpu", engine_dir=None):
            raise ModelLoadError(f"{name} is broken")
        return registry._Backend(unavailable=lambda path, device, options: None, load=load)

    for name in ("onnxruntime", "torch"):
        monkeypatch.setitem(registry._BACKENDS, name, broken(name))
    monkeypatch.setitem(registry._BACKENDS, "tensorrt",
                        registry._Backend(unavailable=lambda p, d, o: "absent", load=registry._trt.load))
    with pytest.raises(ModelLoadError, match="onnxruntime is broken.*torch is broken"):
        load_engine(tmp_path)
    no_torch = registry._Backend(unavailable=lambda p, d, o: "torch is not installed", load=registry._load_torch)
    monkeypatch.setitem(registry._BACKENDS, "torch", no_torch)
    with pytest.raises(ModelLoadError, match="^onnxruntime is broken$"):  # one failure: raised as it is
        load_engine(tmp_path)
    monkeypatch.setitem(registry._BACKENDS, "onnxruntime",
                        registry._Backend(unavailable=lambda p, d, o: "no export", load=registry._ort.load))
    with pytest.raises(EngineError, match="no inference backend.*tensorrt: absent; onnxruntime: no export; torch: "):
        load_engine(tmp_path)


def test_auto_bad_model_dir_is_the_torch_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_engine(tmp_path / "missing", engine_dir=tmp_path / "missing_too")


def test_auto_refuses_an_option_no_backend_takes(model_copy):
    with pytest.raises(ValueError, match="no backend takes option.*engine_dirr"):
        load_engine(model_copy, engine_dirr="/x")


# ------------------------------------------------------------------------------ explicit backends
@pytest.mark.parametrize(("backend", "option"), [("torch", "engine_dir"), ("onnxruntime", "dtype"),
                                                 ("tensorrt", "num_threads"), ("tensorrt", "dtype")])
def test_explicit_backend_refuses_options_it_does_not_take(model_copy, backend, option):
    with pytest.raises(ValueError, match=f"backend '{backend}' does not take option.*{option}"):
        load_engine(model_copy, backend=backend, **{option: "x"})


def test_explicit_onnxruntime_with_engine_dir(model_copy, export_dir):
    engine = load_engine(model_copy, backend="onnxruntime", engine_dir=export_dir, num_threads=1)
    try:
        assert engine.backend == "onnxruntime" and answer_ok(engine)
    finally:
        engine.close()
    with pytest.raises(ModelLoadError, match="no ONNX export"):
        load_engine(model_copy, backend="onnxruntime")


def test_docstring_lists_every_backends_options():
    doc = load_engine.__doc__
    items = dict(re.findall(r"^\s*- (\w+): (.*?)(?=^\s*- |\n\s*\n)", doc, re.S | re.M))
    assert set(items) == set(backend_names())
    names = r"\b(engine_dir|dtype|num_threads|max_question_chars|is_placeholder|providers|device)\b"
    for name, text in items.items():
        assert set(re.findall(names, text)) == set(backend_options(name)), name


def test_greedy_tokens_shared_stopping_rules():
    """The decode loop of every backend: stop token, max_new_tokens, on_token False, cancel, and a
    backend that cannot go further (TensorRT's maximum length: the step returns None)."""
    import threading

    from vlsi_model.engine.base import greedy_tokens

    def counting(last_id, n):
        return last_id + 1

    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    assert greedy_tokens(1, counting, {4}, 10, text) == ([1, 2, 3], False)
    assert greedy_tokens(1, counting, {99}, 3, text) == ([1, 2, 3], False)
    assert greedy_tokens(4, counting, {4}, 3, text) == ([], False)
    assert greedy_tokens(1, lambda last, n: None if n >= 2 else last + 1, {99}, 10, text) == ([1, 2], False)
    seen = []
    assert greedy_tokens(1, counting, {99}, 10, text, lambda t, n: seen.append(t) or n < 2) == ([1, 2], True)
    assert seen == ["1", "1 2"]
    cancel = threading.Event()
    cancel.set()
    assert greedy_tokens(1, counting, {99}, 10, text, cancel=cancel) == ([1], True)
