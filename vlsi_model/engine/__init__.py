"""Inference backends behind one `Engine` interface, chosen by name.

Backends are registered as (availability check, factory) pairs and imported only when
used: importing this package must stay cheap and must not import torch, onnxruntime or
tensorrt unless that backend is actually loaded (it also keeps `vlsi_model.prompting`,
which imports `engine.base`, free of import cycles). To add a backend, write its module
and add one `_BACKENDS` entry; "auto" tries them in the order of `AUTO_ORDER`.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlsi_model.engine.base import AnswerResult, Engine, EngineError, ModelLoadError, TokenCallback

__all__ = [
    "AUTO_ORDER",
    "AnswerResult",
    "Engine",
    "EngineError",
    "ModelLoadError",
    "TokenCallback",
    "available_backends",
    "backend_names",
    "load_engine",
]


@dataclass(frozen=True)
class _Backend:
    available: Callable[[str | Path, str], bool]  # (model_path, device) -> can this backend serve it here?
    load: Callable[..., Engine]  # (model_path, device=..., **kw) -> Engine


def _torch_available(model_path: str | Path, device: str) -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def _load_torch(
    model_path: str | Path,
    device: str = "cpu",
    dtype: Any = None,
    num_threads: int | None = None,
    max_question_chars: int | None = None,
    is_placeholder: bool | None = None,
) -> Engine:
    from vlsi_model.engine.torch_engine import TorchEngine
    from vlsi_model.prompting import DEFAULT_MAX_QUESTION_CHARS

    return TorchEngine.from_dir(
        model_path,
        device=device,
        dtype=dtype,
        num_threads=num_threads,
        max_question_chars=max_question_chars or DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder=is_placeholder,
    )


# Cheap to import: both modules import onnxruntime / tensorrt only when an engine is loaded.
from vlsi_model.engine import onnxruntime_engine as _ort  # noqa: E402
from vlsi_model.engine import tensorrt_engine as _trt  # noqa: E402

_BACKENDS: dict[str, _Backend] = {
    "torch": _Backend(available=_torch_available, load=_load_torch),
    "onnxruntime": _Backend(available=_ort.available, load=_ort.load),  # needs an export (vlsi export)
    "tensorrt": _Backend(available=_trt.available, load=_trt.load),  # needs engines (vlsi build-engine)
}
# Best first: each is available only when its artefacts for the model are present.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime", "torch")


def backend_names() -> list[str]:
    """Valid values of `backend` (besides "auto")."""
    return list(_BACKENDS)


def available_backends(model_path: str | Path, device: str = "cpu") -> list[str]:
    """Backends that could serve `model_path` on `device` here, best first."""
    return [name for name in AUTO_ORDER if _BACKENDS[name].available(model_path, device)]


def load_engine(
    model_path: str | Path | None = None, backend: str = "auto", device: str = "cpu", **kw: Any
) -> Engine:
    """Load `model_path` (None: the default student, see `vlsi_model.defaults`) with `backend`.

    backend "auto" picks the best available one. Extra keyword arguments go to the
    backend (torch: dtype, num_threads, max_question_chars, is_placeholder). Raises
    ValueError for an unknown backend or an option the chosen backend does not take, and
    ModelLoadError for a bad model directory.
    """
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(_BACKENDS)}")
    if model_path is None:
        from vlsi_model.defaults import default_model_path

        model_path = default_model_path()
    if backend == "auto":
        candidates = available_backends(model_path, device)
        if not candidates:
            raise EngineError(f"no inference backend is available for {model_path} on {device}")
        backend = candidates[0]
    load = _BACKENDS[backend].load
    try:  # an option the backend does not use is an error, not silently ignored
        inspect.signature(load).bind(model_path, device=device, **kw)
    except TypeError:
        accepted = [p for p in inspect.signature(load).parameters if p not in ("model_path", "device")]
        unknown = sorted(set(kw) - set(accepted))
        raise ValueError(
            f"backend {backend!r} does not take option(s) {', '.join(unknown)} (it takes: {', '.join(accepted)})"
        ) from None
    return load(model_path, device=device, **kw)
