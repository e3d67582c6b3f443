"""Inference backends behind one `Engine` interface, chosen by name.

Backends are registered as (availability check, factory) pairs and imported only when
used: importing this package must stay cheap and must not import torch, onnxruntime or
tensorrt unless that backend is actually loaded (`vlsi_model.prompting`, which the backends
use, imports only `engine.validation` and `errors` from here: no import cycle). To add a backend, write its module
and add one `_BACKENDS` entry; "auto" tries them in the order of `AUTO_ORDER`.

A backend's options are the keyword parameters of its loader (after model_path, device);
`backend_options(name)` lists them. Availability checks see the same options as the
loader (an `engine_dir` decides where the onnxruntime / tensorrt artefacts are looked for).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlsi_model.engine.base import AnswerResult, Engine, EngineError, ModelLoadError, TokenCallback
from vlsi_model.engine_dirs import resolve_engine_dir
from vlsi_model.manifest import export_unsupported, find_export_dir

__all__ = [
    "AUTO_ORDER",
    "AnswerResult",
    "Engine",
    "EngineError",
    "ModelLoadError",
    "TokenCallback",
    "available_backends",
    "backend_names",
    "backend_options",
    "load_engine",
    "unavailable_reasons",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Backend:
    # (model_path, device, options) -> None when this backend can serve the model here, else why not.
    unavailable: Callable[[Path, str, Mapping[str, Any]], str | None]
    load: Callable[..., Engine]  # (model_path, device=..., **options) -> Engine

    def options(self) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(self.load).parameters if p not in ("model_path", "device"))


def _torch_unavailable(model_path: Path, device: str, options: Mapping[str, Any]) -> str | None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None  # a bad model directory is the loader's error to report (ModelLoadError)


def _load_torch(
    model_path: str | Path,
    device: str = "cpu",
    dtype: Any = None,
    num_threads: int | None = None,
    max_question_chars: int | None = None,
    is_placeholder: bool | None = None,
) -> Engine:
    from vlsi_model.engine.torch_engine import TorchEngine
    from vlsi_model.engine.validation import DEFAULT_MAX_QUESTION_CHARS

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


def _where(engine_dir: Any, model_path: Path, subdir: str) -> str:
    return str(engine_dir) if engine_dir is not None else f"{model_path} or {model_path / subdir}"


def _not_exportable(model_path: Path) -> str | None:
    """Why no ONNX export (so no onnxruntime / tensorrt engine) can exist for this model's architecture."""
    return export_unsupported(model_path)


def _onnxruntime_unavailable(model_path: Path, device: str, options: Mapping[str, Any]) -> str | None:
    not_exportable = _not_exportable(model_path)
    if not_exportable is not None:
        return not_exportable
    engine_dir = options.get("engine_dir")
    if find_export_dir(model_path, engine_dir) is None:
        return f"no ONNX export in {_where(engine_dir, model_path, 'onnx')} (make one with `vlsi export`)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    if device != "cpu" and not device.startswith("cuda"):
        return f"device {device!r} (onnxruntime runs on cpu or cuda)"
    return None


def _tensorrt_unavailable(model_path: Path, device: str, options: Mapping[str, Any]) -> str | None:
    not_exportable = _not_exportable(model_path)
    if not_exportable is not None:
        return not_exportable
    engine_dir = options.get("engine_dir")
    found = _trt.find_engine_dir(model_path, engine_dir)
    if found is None:
        where = engine_dir if engine_dir is not None else (
            f"{model_path}, {model_path / 'tensorrt'} or its set in trt_engines/")
        return f"no TensorRT engines in {where}"
    if not _trt.tensorrt_available():
        return f"engines in {found}, but TensorRT is not installed"
    if not device.startswith("cuda"):
        return f"engines in {found}, but device is {device!r} (TensorRT runs on cuda: pass device='cuda')"
    return None


_BACKENDS: dict[str, _Backend] = {
    "torch": _Backend(unavailable=_torch_unavailable, load=_load_torch),
    "onnxruntime": _Backend(unavailable=_onnxruntime_unavailable, load=_ort.load),  # needs an export (vlsi export)
    "tensorrt": _Backend(unavailable=_tensorrt_unavailable, load=_trt.load),  # needs engines (vlsi build-engine)
}
# Best first: each is available only when its artefacts for the model are present.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime", "torch")
# Backends that run a `vlsi export` (not for every architecture: manifest.EXPORTABLE_MODEL_TYPES).
_EXPORT_BACKENDS = ("onnxruntime", "tensorrt")


def backend_names() -> list[str]:
    """Valid values of `backend` (besides "auto")."""
    return list(_BACKENDS)


def backend_options(backend: str) -> list[str]:
    """Keyword options `load_engine` passes to `backend` (besides model_path and device)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(_BACKENDS)}")
    return list(_BACKENDS[backend].options())


def _normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if out.get("engine_dir") in (None, ""):  # "" (an unset ROS parameter) means "not given", not the cwd
        out.pop("engine_dir", None)
    else:  # a bare name is an engine set under trt_engines/ (vlsi_model.engine_dirs)
        out["engine_dir"] = resolve_engine_dir(out["engine_dir"])
    return out


def unavailable_reasons(model_path: str | Path, device: str = "cpu", **options: Any) -> dict[str, str | None]:
    """For every backend in `AUTO_ORDER`: None when it could serve `model_path` here, else why not."""
    path, opts = Path(model_path), _normalise(options)
    return {name: _BACKENDS[name].unavailable(path, device, opts) for name in AUTO_ORDER}


def available_backends(model_path: str | Path, device: str = "cpu", **options: Any) -> list[str]:
    """Backends that could serve `model_path` on `device` with `options` (engine_dir) here, best first."""
    return [name for name, why in unavailable_reasons(model_path, device, **options).items() if why is None]


def _check_options(backend: str, options: Mapping[str, Any]) -> None:
    accepted = _BACKENDS[backend].options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:  # an option the backend does not use is an error, not silently ignored
        raise ValueError(
            f"backend {backend!r} does not take option(s) {', '.join(unknown)} (it takes: {', '.join(accepted)})"
        )


def load_engine(
    model_path: str | Path | None = None, backend: str = "auto", device: str = "cpu", **kw: Any
) -> Engine:
    """Load `model_path` (None: the default student, see `vlsi_model.defaults`) with `backend`.

    Keyword options per backend (see also `backend_options`):

    - torch: dtype (e.g. torch.float16 or "float16"), num_threads (torch's process-wide
      intra-op threads), max_question_chars, is_placeholder;
    - onnxruntime: engine_dir (the export; default `model_path` itself or `<model_path>/onnx`),
      num_threads (ONNX Runtime intra-op threads), max_question_chars, is_placeholder;
    - tensorrt: engine_dir (the engines of `vlsi build-engine`: a path or a set name in trt_engines/;
      default `model_path` itself, `<model_path>/tensorrt` or the model's default set built from
      it), max_question_chars, is_placeholder.

    An explicitly named backend raises ValueError for an option it does not take (a setting
    is never silently ignored). backend "auto" takes the first of `AUTO_ORDER` that can serve
    the model here with these options: tensorrt when TensorRT is installed, `device` is cuda
    and engines are in engine_dir (or next to the model); else onnxruntime when an export is
    in engine_dir (or next to the model); else torch. The chosen backend gets the options it
    takes; the others (e.g. engine_dir or dtype when it falls back to torch) are dropped, and
    why each better backend was passed over is logged (logger `vlsi_model.engine`). If the
    chosen backend cannot load its artefacts (ModelLoadError: a corrupt export, engines built
    for another GPU), auto logs a warning and tries the next one. Only an option no backend
    takes is a ValueError under auto.

    An architecture `vlsi export` does not handle (`manifest.EXPORTABLE_MODEL_TYPES`)
    runs on torch only: onnxruntime / tensorrt named explicitly raise ModelLoadError saying
    so, and auto passes them over with that reason.

    Raises ValueError for an unknown backend or option, ModelLoadError for a bad model
    directory or artefacts (or a backend that cannot serve the architecture), EngineError
    when no backend is available at all.
    """
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(_BACKENDS)}")
    kw = _normalise(kw)
    if backend != "auto":
        _check_options(backend, kw)
    if model_path is None:
        from vlsi_model.defaults import default_model_path

        model_path = default_model_path()
    if backend != "auto":
        if backend in _EXPORT_BACKENDS:
            not_exportable = _not_exportable(Path(model_path))
            if not_exportable is not None:
                raise ModelLoadError(f"{model_path}: backend {backend} cannot serve this model: {not_exportable}")
        return _BACKENDS[backend].load(model_path, device=device, **kw)
    return _load_auto(model_path, device, kw)


def _load_auto(model_path: str | Path, device: str, kw: dict[str, Any]) -> Engine:
    known = {opt for b in _BACKENDS.values() for opt in b.options()}
    unknown = sorted(set(kw) - known)
    if unknown:
        takes = "; ".join(f"{name}: {', '.join(b.options())}" for name, b in _BACKENDS.items())
        raise ValueError(f"no backend takes option(s) {', '.join(unknown)} ({takes})")
    passed_over: list[str] = []
    failures: list[tuple[str, ModelLoadError]] = []
    for name in AUTO_ORDER:
        entry = _BACKENDS[name]
        why = entry.unavailable(Path(model_path), device, kw)
        if why is not None:
            passed_over.append(f"{name}: {why}")
            continue
        accepted = entry.options()
        dropped = sorted(set(kw) - set(accepted))
        # A warning when a given option goes unused (engine_dir without an export: the caller
        # expected another backend), else info.
        log.log(logging.WARNING if dropped else logging.INFO, "backend auto: using %s for %s%s%s", name, model_path,
                f"; it does not use option(s) {', '.join(dropped)}, ignored" if dropped else "",
                f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
        try:
            return entry.load(model_path, device=device, **{k: v for k, v in kw.items() if k in accepted})
        except ModelLoadError as exc:
            log.warning("backend auto: %s could not load %s (%s); trying the next backend", name, model_path, exc)
            failures.append((name, exc))
            passed_over.append(f"{name}: failed to load ({exc})")
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        detail = "; ".join(f"{name}: {exc}" for name, exc in failures)
        raise ModelLoadError(f"no backend could load {model_path}: {detail}") from failures[-1][1]
    raise EngineError(f"no inference backend is available for {model_path} on {device}: {'; '.join(passed_over)}")
