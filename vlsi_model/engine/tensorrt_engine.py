"""TensorRT backend (Jetson / CUDA hosts): the ONNX export's graphs as serialized TensorRT 10 engines.

Why one file of ~770 lines: one backend is one file, and it is the only module that touches
TensorRT's API, so a reader checks it against the TensorRT headers in one place.

This module is the ONLY place that imports `tensorrt` (`load_tensorrt`; `tensorrt_build`
uses it too), and it does so lazily, so everything else (including the pure functions below:
engine-directory manifest checks) imports and is tested where TensorRT is absent.

Why engines are refused instead of "tried": a serialized TensorRT engine is only valid for
the TensorRT version and the GPU (compute capability) it was built on; deserializing it
elsewhere fails with an obscure error or, across minor versions, not at all until results
go wrong. `check_engine_manifest` compares the engine directory's `manifest.json` (written
by `vlsi build-engine`) with the running TensorRT and GPU and says how to rebuild.

Runtime design (TensorRT 10 name-based API, documented in the TensorRT Python API reference):
- `trt.Runtime(logger).deserialize_cuda_engine(bytes)` per graph; one execution context
  for the vision engine and one per optimisation profile of the decoder engine (profile 0
  "prefill": a prompt after the pad slot, 1 "decode": one token, 2 "extend": a question's own
  tokens after a shared prefix, built by `tensorrt_build`), each selected once with
  `set_optimization_profile_async`. All are USER_MANAGED and share one scratch buffer
  (`_create_contexts`). Engines built before the extend profile existed load and answer;
  their `answer_many` shares the vision pass but prefills each question whole (rebuild them
  to share the prefix too).
- Per call: `context.set_input_shape(name, shape)` for every input, `set_tensor_address`
  for every input and output, `execute_async_v3(stream)`.
- Device memory and copies via NVIDIA's cuda-python (`cuda.bindings.runtime`, or the older
  `cuda.cudart` import path): cudaMalloc/cudaMemcpyAsync/cudaStreamCreate. Chosen over
  `torch.cuda` so that the Jetson runtime needs no PyTorch (JetPack's torch wheels are a
  separate, version-locked install); `pip install cuda-python` matching the CUDA of JetPack.
- KV cache: preallocated device buffer sets (max context) used ping-pong: a step reads
  past from one set and writes present into the other, then they swap: the cache never
  leaves the GPU and is never copied. A third set holds a frame's shared prefix in
  `answer_many`: every question's extend step reads it and writes into the ping-pong pair, so
  the prefix is computed once and never overwritten while the frame's questions are answered.
- Prefill uses one masked "pad" slot as its past (a zero key/value whose attention bias is
  the mask value, in prefill and every decode step), so no engine input ever has a zero
  length: empty tensors in optimisation profiles are poorly supported across 10.x releases.
  The masked slot gets exactly zero attention weight, so results are unchanged.
- Qwen3-VL (DeepStack): the vision engine's second output (deepstack_embeds [K, M, hidden])
  is scattered to the image tokens' positions for the prefill's deepstack_embeds input
  (`np_inputs.deepstack_at_tokens`); decode steps pass zeros, as the ONNX Runtime backend does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.engine.base import (
    AnswerResult,
    EngineError,
    ModelLoadError,
    TokenCallback,
    greedy_tokens,
    image_prefix_length,
    per_question,
    split_shared_time,
)
from vlsi_model.manifest import MANIFEST_FILE, load_manifest, read_metadata_json, sha256_file

log = logging.getLogger(__name__)

ENGINE_MANIFEST = "manifest.json"
ENGINE_FORMAT = "vlsi-tensorrt-engines"
ENGINE_FORMAT_VERSION = 1
PAD_SLOTS = 1  # masked past slots in front of the real KV cache (see module docstring)
PREFILL_PROFILE, DECODE_PROFILE, EXTEND_PROFILE = 0, 1, 2
DECODER_PROFILE_NAMES = ("prefill", "decode", "extend")  # the decoder engine's profiles, in index order
PREFIX_SET = 2  # the KV set holding answer_many's shared prefix (sets 0 and 1 ping-pong)


class TensorRTUnavailable(ModelLoadError):
    """TensorRT (or cuda-python) is not installed here; the message says what to install."""


class EngineMismatchError(ModelLoadError):
    """An engine directory built for another TensorRT version or GPU; the message says how to rebuild."""


def load_tensorrt() -> Any:
    """`import tensorrt`, or TensorRTUnavailable with what to do. The one TensorRT import of the project."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - deliberately lazy
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed in this Python environment. On a Jetson it comes with JetPack 6.1+ "
            "(TensorRT 10.x: `sudo apt install python3-libnvinfer`; in a venv use --system-site-packages); "
            "on an x86 CUDA host `pip install tensorrt` (NVIDIA's index). The ONNX export runs without it "
            "(backend onnxruntime)."
        ) from exc
    major, minor = (int(x) for x in (str(trt.__version__).split(".") + ["0"])[:2])
    if (major, minor) < (10, 1):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found, but 10.1 or newer is required (JetPack 6.1+ "
                                  "ships 10.3): the runtime shares one scratch buffer between its contexts with "
                                  "the 10.1 API (get_device_memory_size_for_profile_v2, set_device_memory)")
    return trt


def tensorrt_available() -> bool:
    """Cheap check (no import) for the backend registry and tests."""
    return importlib.util.find_spec("tensorrt") is not None


# ----------------------------------------------------------------------------- manifest (pure)
UNKNOWN_CC = ("?", "", "None", "unknown")


def check_engine_manifest(manifest: dict[str, Any], tensorrt_version: str, gpu: dict[str, Any],
                          engine_dir: str | Path = "<engine dir>") -> None:
    """Raise EngineMismatchError unless `manifest` was built by this TensorRT version for this GPU.

    Pure function (no TensorRT needed): `tensorrt_version` is `trt.__version__`, `gpu` is
    {"name": ..., "compute_capability": "8.7"} of the device that will run the engines.
    The TensorRT version must match exactly (engines are not compatible across versions
    unless built version-compatible, which we do not, for speed); the compute capability
    must match (an engine holds kernels for one SM architecture); a different GPU name with
    the same compute capability is accepted (e.g. Orin NX vs AGX Orin share sm_87) because
    TensorRT accepts it, but it may run with kernels tuned for the other board.
    """
    if manifest.get("format") != ENGINE_FORMAT:
        raise EngineMismatchError(f"{engine_dir}: {ENGINE_MANIFEST} is not a vlsi TensorRT engine manifest")
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise EngineMismatchError(
            f"{engine_dir}: engine manifest version {manifest.get('format_version')}, this vlsi_model reads "
            f"{ENGINE_FORMAT_VERSION}; {rebuild_hint(manifest, engine_dir)}"
        )
    built_trt = str(manifest.get("tensorrt_version", "?"))
    built_gpu = manifest.get("gpu") or {}
    problems = []
    if built_trt != str(tensorrt_version):
        problems.append(f"built with TensorRT {built_trt}, running TensorRT {tensorrt_version}")
    built_cc, run_cc = str(built_gpu.get("compute_capability", "?")), str(gpu.get("compute_capability", "?"))
    if built_cc in UNKNOWN_CC or run_cc in UNKNOWN_CC:
        # Not known on one side (cuda-python was missing): TensorRT itself refuses a plan built for
        # another SM at deserialization, so do not refuse here forever on a missing fact.
        log.warning("%s: the GPU's compute capability is unknown (built: %s, running: %s); TensorRT checks it "
                    "when it loads the engines", engine_dir, built_cc, run_cc)
    elif built_cc != run_cc:
        problems.append(
            f"built for {built_gpu.get('name', '?')} (compute capability {built_cc}), running on "
            f"{gpu.get('name', '?')} (compute capability {run_cc})"
        )
    if problems:
        raise EngineMismatchError(
            f"{engine_dir}: TensorRT engines do not match this system: {'; '.join(problems)}. "
            f"{rebuild_hint(manifest, engine_dir)}"
        )


def rebuild_hint(manifest: dict[str, Any], engine_dir: str | Path) -> str:
    """The command that rebuilds `engine_dir` here from its ONNX export."""
    onnx_dir = (manifest.get("source_export") or {}).get("dir") or "<onnx export dir>"
    precision = manifest.get("precision", "fp16")
    flag = "--int8" if precision == "int8" else "--fp16"
    return f"Rebuild them on this device: vlsi build-engine --onnx {onnx_dir} --out {engine_dir} {flag}"


def check_engine_files(manifest: dict[str, Any], engine_dir: str | Path) -> None:
    """Raise EngineMismatchError unless the engine directory holds the files its manifest names,
    as they were built: each plan of the recorded size, and every file copied beside the engines
    (the export manifest, embeddings, tokenizer) with the recorded sha256; the copied export
    manifest must also be the one the engines were built from. The plans' own sha256 is checked
    when they are read (`plan_bytes`), from the bytes already in memory. An edited manifest or a
    file swapped after the build fails here with a rebuild hint instead of loading a mismatch."""

    engine_dir = Path(engine_dir)
    hint = rebuild_hint(manifest, engine_dir)
    engines = manifest.get("engines")
    if not isinstance(engines, dict) or not {"vision", "decoder"} <= set(engines):
        raise EngineMismatchError(f"{engine_dir}: {ENGINE_MANIFEST} names no vision and decoder engines. {hint}")
    for graph in ("vision", "decoder"):
        info = engines[graph]
        path = engine_dir / str(info.get("file", ""))
        if not path.is_file():
            raise EngineMismatchError(f"{path}: the {graph} engine named in {ENGINE_MANIFEST} is missing. {hint}")
        if "size_bytes" in info and path.stat().st_size != int(info["size_bytes"]):
            raise EngineMismatchError(f"{path}: {path.stat().st_size} bytes, the manifest records "
                                      f"{info['size_bytes']}: the engine changed after it was built. {hint}")
    expected = dict(manifest.get("copied_sha256") or {})
    source = (manifest.get("source_export") or {}).get("export_manifest_sha256")
    if source:
        expected.setdefault(MANIFEST_FILE, source)
        if expected[MANIFEST_FILE] != source:
            raise EngineMismatchError(f"{engine_dir}: {ENGINE_MANIFEST} disagrees with itself about the export "
                                      f"manifest's hash. {hint}")
    for name, digest in expected.items():
        path = engine_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise EngineMismatchError(f"{path}: missing or different from the file the engines were built with "
                                      f"(sha256 mismatch). {hint}")


def plan_bytes(engine_dir: str | Path, info: dict[str, Any], manifest: dict[str, Any]) -> Any:
    """The serialized engine named by `info` as a read-only memory map (checked against its recorded
    sha256 when there is one).

    Why a map and not `read_bytes()`: TensorRT copies the weights out of the plan while it
    deserializes; with the plan also read into the heap, a Jetson (whose GPU shares the DRAM)
    holds the weights twice at load. A file-backed read-only map costs page cache the kernel can
    drop. The caller closes the map once the engine is deserialized."""
    import hashlib
    import mmap

    path = Path(engine_dir) / str(info["file"])
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    digest = info.get("sha256")
    if digest and hashlib.sha256(data).hexdigest() != digest:
        data.close()
        raise EngineMismatchError(f"{path}: sha256 differs from the one recorded at build time. "
                                  f"{rebuild_hint(manifest, engine_dir)}")
    return data


def load_engine_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """Read `manifest.json` of an engine directory; ModelLoadError saying what is wrong."""
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{engine_dir}: no {ENGINE_MANIFEST}; build engines with `vlsi build-engine`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data


def _default_set_of(model_path: Path) -> list[Path]:
    """The model's default engine set (`vlsi build-engine` without --name/--out), when it was built
    from this very model directory (a same-named set of another model is not taken)."""
    from vlsi_model.engine_dirs import engine_set_name, engines_root, set_source

    candidate = engines_root() / engine_set_name(model_path, read_metadata_json(model_path).get("name"))
    source = set_source(candidate)
    return [candidate] if source and Path(source) == model_path.expanduser().resolve() else []


def find_engine_dir(model_path: str | Path, engine_dir: str | Path | None = None) -> Path | None:
    """`engine_dir`; or, without one, `model_path` itself, `<model_path>/tensorrt` or the model's
    default set in trt_engines/ (built from this model), whichever holds an engine manifest."""
    model_path = Path(model_path)
    candidates = [Path(engine_dir)] if engine_dir is not None else [
        model_path, model_path / "tensorrt", *_default_set_of(model_path)]
    for cand in candidates:
        path = cand / ENGINE_MANIFEST
        if path.is_file():
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("format") == ENGINE_FORMAT:
                    return cand
            except (OSError, ValueError):
                continue
    return None


# ----------------------------------------------------------------------------- CUDA (cuda-python)
class _Cuda:
    """The few CUDA runtime calls the engine needs, through cuda-python."""

    def __init__(self, device_index: int = 0) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError as exc:
                raise TensorRTUnavailable(
                    "the TensorRT backend needs cuda-python for device memory: `pip install cuda-python` "
                    "(the version matching your CUDA / JetPack)"
                ) from exc
        self.rt = cudart
        self._call(cudart.cudaSetDevice(device_index))
        self.device_index = device_index
        self.stream = self._call(cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)
        self._allocs: list[int] = []

    def _call(self, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != int(self.rt.cudaError_t.cudaSuccess):
            raise EngineError(f"CUDA error {err}")
        if isinstance(result, tuple) and len(result) > 1:
            return result[1] if len(result) == 2 else result[1:]
        return None

    def gpu_info(self) -> dict[str, Any]:
        prop = self._call(self.rt.cudaGetDeviceProperties(self.device_index))
        name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name, "compute_capability": f"{prop.major}.{prop.minor}",
                "total_memory_mb": int(prop.totalGlobalMem) >> 20}

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1))))
        self._allocs.append(ptr)
        return ptr

    def memset(self, ptr: int, nbytes: int) -> None:
        self._call(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream))

    def h2d(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._call(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def d2h(self, array: np.ndarray, ptr: int) -> np.ndarray:
        self._call(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        return array

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr in self._allocs:
            self.rt.cudaFree(ptr)
        self._allocs.clear()
        self.rt.cudaStreamDestroy(self.stream)


# ----------------------------------------------------------------------------- the engine
def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class TensorRTEngine:
    """`Engine` on TensorRT 10 engines built by `vlsi build-engine`. Not thread-safe (see `Engine`)."""

    backend = "tensorrt"

    def __init__(self, engine_dir: str | Path, device: str = "cuda", max_question_chars: int = 1000,
                 is_placeholder: bool | None = None) -> None:
        from vlsi_model.engine.np_inputs import ImageConfig, PromptBuilder, VisionSpec
        from vlsi_model.engine.onnxruntime_engine import _image_config_with_limits

        trt = load_tensorrt()
        self.trt = trt
        self.engine_dir = Path(engine_dir)
        self.manifest = load_engine_manifest(self.engine_dir)
        index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        if not device.startswith("cuda"):
            raise ModelLoadError(f"the tensorrt backend runs on a CUDA device (cuda, cuda:N), not {device!r}")
        self.cuda = _Cuda(index)
        check_engine_manifest(self.manifest, trt.__version__, self.cuda.gpu_info(), self.engine_dir)
        check_engine_files(self.manifest, self.engine_dir)
        # the export's manifest, embedding and rope tables are copied beside the plans (not its graphs)
        self.export = em = load_manifest(self.engine_dir, graphs=False)
        self.model_name = str(self.manifest.get("model_name") or em.get("model_name") or self.engine_dir.name)
        meta = read_metadata_json(self.engine_dir)
        self.is_placeholder = bool(meta.get("placeholder", False)) if is_placeholder is None else is_placeholder
        self.max_question_chars = max_question_chars
        text, vision = em["text"], em["vision"]
        self.num_layers, self.num_kv_heads = int(text["num_layers"]), int(text["num_kv_heads"])
        self.head_dim, self.hidden = int(text["head_dim"]), int(text["hidden_size"])
        self.mrope_section = [int(s) for s in text["mrope_section"]]
        self.mrope_interleaved = bool(text.get("mrope_interleaved", False))
        self.deepstack_layers = int(text.get("deepstack_layers") or 0)
        self.stop_token_ids = frozenset(int(t) for t in text["stop_token_ids"])
        self.mask_value = float(text["mask_value"])
        self.vision_spec = VisionSpec(em["model_type"], int(vision["merge_size"]), int(vision["patch_size"]),
                                      int(vision.get("window_size") or 0), int(vision.get("position_grid") or 0))
        self.image_config = _image_config_with_limits(
            ImageConfig.from_json(self.engine_dir / "preprocessor_config.json"), em["image"])
        self.prompts = PromptBuilder.from_dir(self.engine_dir)
        self.image_token_id = self.prompts.image_token_id
        self.embed_tokens = np.asarray(np.load(self.engine_dir / em["files"]["embed_tokens"], mmap_mode="r"))
        with np.load(self.engine_dir / em["files"]["rope"]) as rope:
            self.text_inv_freq = np.array(rope["text_inv_freq"], dtype=np.float32)
            self.vision_inv_freq = np.array(rope["vision_inv_freq"], dtype=np.float32)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engines = self.manifest["engines"]
        self._vision_engine = self._deserialize(engines["vision"])
        self._decoder_engine = self._deserialize(engines["decoder"])
        self._create_contexts()
        self._allocate()
        self._closed = False

    def _create_contexts(self) -> None:
        """The execution contexts (vision; the decoder's prefill, decode and, when built, extend
        profiles) on ONE scratch buffer: they run one at a time on one stream, so the activation
        memory each would otherwise allocate for its largest profile (STATIC) is shared: the max
        of them instead of their sum (TensorRT 10.1+: USER_MANAGED contexts,
        `get_device_memory_size_for_profile_v2`, `set_device_memory`)."""
        trt, ve, de = self.trt, self._vision_engine, self._decoder_engine
        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        contexts = [(ve, 0), (de, PREFILL_PROFILE), (de, DECODE_PROFILE)]
        if int(de.num_optimization_profiles) > EXTEND_PROFILE:
            contexts.append((de, EXTEND_PROFILE))
        self.scratch_bytes = max(int(engine.get_device_memory_size_for_profile_v2(profile))
                                 for engine, profile in contexts)
        self._scratch = self.cuda.malloc(self.scratch_bytes)
        made = []
        for engine, profile in contexts:
            ctx = engine.create_execution_context(user_managed)
            if ctx is None:
                raise EngineError("TensorRT could not create an execution context")
            ctx.set_device_memory(self._scratch, self.scratch_bytes)
            if engine is de and not ctx.set_optimization_profile_async(profile, self.cuda.stream_handle):
                raise EngineError(f"TensorRT refused optimisation profile {profile} of the decoder engine")
            made.append(ctx)
        self._vision_ctx, self._prefill_ctx, self._decode_ctx = made[:3]
        self._extend_ctx = made[3] if len(made) > 3 else None
        self._profile_of = {id(ctx): profile for ctx, (_, profile) in zip(made[1:], contexts[1:], strict=True)}
        if self._extend_ctx is None:
            log.info("%s: the decoder engine has no extend profile (built by an older vlsi build-engine): "
                     "questions about one frame share the vision pass, each is prefilled whole; rebuild to "
                     "share the prompt prefix too", self.engine_dir)
        self.cuda.sync()

    def _deserialize(self, info: dict[str, Any]) -> Any:
        plan = plan_bytes(self.engine_dir, info, self.manifest)
        try:
            engine = self._runtime.deserialize_cuda_engine(plan)
        finally:
            plan.close()
        if engine is None:
            raise EngineMismatchError(f"{self.engine_dir / info['file']}: TensorRT could not deserialize it. "
                                      f"{rebuild_hint(self.manifest, self.engine_dir)}")
        return engine

    def _dtype(self, engine: Any, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(engine.get_tensor_dtype(name)))

    def _set_shape(self, ctx: Any, engine: Any, name: str, shape: tuple[int, ...], profile: int) -> None:
        """`ctx.set_input_shape`, whose False (a shape outside the profile) would otherwise surface
        later as a generic execution failure."""
        if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            static = tuple(engine.get_tensor_shape(name))
            allowed = static if all(d >= 0 for d in static) else \
                " to ".join(str(tuple(d)) for d in engine.get_tensor_profile_shape(name, profile)[::2])
            raise EngineError(f"input {name} of shape {tuple(shape)} is outside what the engine was built for "
                              f"({allowed}); rebuild with wider ranges (vlsi build-engine --image-tokens / "
                              f"--prefill-tokens) or send a smaller image / shorter question")

    def _max_shape(self, engine: Any, name: str, profile: int) -> tuple[int, ...]:
        static = tuple(engine.get_tensor_shape(name))
        if all(d >= 0 for d in static):  # e.g. a fixed-image-size vision engine: no profile
            return static
        return tuple(engine.get_tensor_profile_shape(name, profile)[2])

    def _allocate(self) -> None:
        """Device buffers at the profiles' maximum shapes, allocated once."""
        ve, de = self._vision_engine, self._decoder_engine
        self._vbuf: dict[str, int] = {}
        for i in range(ve.num_io_tensors):
            name = ve.get_tensor_name(i)
            if ve.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                shape = self._max_shape(ve, name, 0)
            else:  # image_embeds [M, hidden] (+ deepstack_embeds [K, M, hidden]): M <= patches / merge_size**2
                patches = self._max_shape(ve, "pixel_values", 0)[0]
                shape = (patches // self.vision_spec.merge_size**2, self.hidden)
                if name == "deepstack_embeds":
                    shape = (self.deepstack_layers, *shape)
            self._vbuf[name] = self.cuda.malloc(int(np.prod(shape)) * self._dtype(ve, name).itemsize)
        self.max_patches = self._max_shape(ve, "pixel_values", 0)[0]
        self.max_prefill = self._max_shape(de, "inputs_embeds", PREFILL_PROFILE)[1]
        self.max_total = self._max_shape(de, "attention_bias", DECODE_PROFILE)[3]
        self.max_extend = (self._max_shape(de, "inputs_embeds", EXTEND_PROFILE)[1]
                           if self._extend_ctx is not None else 0)
        self.kv_dtype = self._dtype(de, "past_key_0")
        self.float_dtype = self._dtype(de, "inputs_embeds")
        per_token = self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize
        # decode's ping-pong pair holds a whole context; answer_many's prefix set only a prompt's
        # past (the extend profile's past maximum)
        tokens = [self.max_total, self.max_total]
        if self._extend_ctx is not None:
            tokens.append(self._max_shape(de, "past_key_0", EXTEND_PROFILE)[2])
        self._kv = [[self.cuda.malloc(n * per_token) for _ in range(2 * self.num_layers)] for n in tokens]
        s = self.max_prefill
        fsize = self.float_dtype.itemsize
        self._dbuf = {
            "inputs_embeds": self.cuda.malloc(s * self.hidden * fsize),
            "rotary_cos": self.cuda.malloc(s * self.head_dim * fsize),
            "rotary_sin": self.cuda.malloc(s * self.head_dim * fsize),
            "attention_bias": self.cuda.malloc(s * max(self.max_total, s + PAD_SLOTS) * fsize),
            **({"deepstack_embeds": self.cuda.malloc(self.deepstack_layers * s * self.hidden * fsize)}
               if self.deepstack_layers else {}),
            "logits": self.cuda.malloc(int(self.export["text"]["vocab_size"]) * 4),
        }
        self._logits = np.empty((1, int(self.export["text"]["vocab_size"])), dtype=np.float32)

    # ------------------------------------------------------------------ stages
    def _run_vision(self, pixel_values: np.ndarray,
                    grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(image embeddings [M, hidden], DeepStack features [K, M, hidden] or None)."""
        from vlsi_model.engine.np_inputs import vision_aux_inputs

        n = pixel_values.shape[0]
        if n > self.max_patches:
            raise EngineError(f"the image needs {n} patches but the vision engine was built for at most "
                              f"{self.max_patches}; rebuild with a larger --image-tokens range or send smaller images")
        feeds = vision_aux_inputs(grid, self.vision_spec, self.vision_inv_freq)
        feeds["pixel_values"] = pixel_values
        ctx, ve = self._vision_ctx, self._vision_engine
        for name, value in feeds.items():
            if name not in self._vbuf:
                continue
            value = np.ascontiguousarray(value, dtype=self._dtype(ve, name))
            self._set_shape(ctx, ve, name, value.shape, 0)
            self.cuda.h2d(self._vbuf[name], value)
            ctx.set_tensor_address(name, self._vbuf[name])
        outputs = ["image_embeds", "deepstack_embeds"] if self.deepstack_layers else ["image_embeds"]
        for name in outputs:
            ctx.set_tensor_address(name, self._vbuf[name])
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise EngineError("TensorRT vision engine failed to run")
        out = []
        for name in outputs:
            out.append(np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(ve, name)))
            self.cuda.d2h(out[-1], self._vbuf[name])
        self.cuda.sync()
        return out[0], (out[1] if self.deepstack_layers else None)

    def _run_decoder(self, ctx: Any, embeds: np.ndarray, cos: np.ndarray, sin: np.ndarray, bias: np.ndarray,
                     past_len: int, src: int, dst: int, deepstack: np.ndarray | None = None) -> np.ndarray:
        """One decoder call reading KV set `src` (length past_len), writing set `dst` (never `src`:
        an engine may read its past while it writes its present).
        `deepstack`: Qwen3-VL's deepstack_embeds [K, 1, seq, hidden] (zeros when None)."""
        seq = embeds.shape[1]
        de, profile = self._decoder_engine, self._profile_of[id(ctx)]
        feeds = [("inputs_embeds", embeds), ("rotary_cos", cos), ("rotary_sin", sin), ("attention_bias", bias)]
        if self.deepstack_layers:
            if deepstack is None:
                deepstack = np.zeros((self.deepstack_layers, 1, seq, self.hidden), dtype=self.float_dtype)
            feeds.append(("deepstack_embeds", deepstack))
        for name, value in feeds:
            value = np.ascontiguousarray(value, dtype=self.float_dtype)
            self._set_shape(ctx, de, name, value.shape, profile)
            self.cuda.h2d(self._dbuf[name], value)
            ctx.set_tensor_address(name, self._dbuf[name])
        kv_shape = (1, self.num_kv_heads, past_len, self.head_dim)
        for i in range(self.num_layers):
            for j, kv in enumerate(("key", "value")):
                slot = 2 * i + j
                self._set_shape(ctx, de, f"past_{kv}_{i}", kv_shape, profile)
                ctx.set_tensor_address(f"past_{kv}_{i}", self._kv[src][slot])
                ctx.set_tensor_address(f"present_{kv}_{i}", self._kv[dst][slot])
        ctx.set_tensor_address("logits", self._dbuf["logits"])
        if seq + past_len > self.max_total:
            raise EngineError(f"context of {seq + past_len} tokens exceeds the engine's {self.max_total}")
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise EngineError("TensorRT decoder engine failed to run")
        self.cuda.d2h(self._logits, self._dbuf["logits"])
        self.cuda.sync()
        return self._logits[0]

    # ------------------------------------------------------------------ Engine
    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")

    def _prompt(self, image: np.ndarray, questions: list[str]) -> tuple[np.ndarray, tuple[int, int, int],
                                                                          list[np.ndarray]]:
        """(pixel values, grid, prompt ids per question) for one validated frame; EngineError for a
        bad image or question, or a prompt longer than the engine's prefill profile."""
        from vlsi_model.engine.np_inputs import frame_prompts

        pixel_values, grid, ids = frame_prompts(image, questions, self.image_config, self.vision_spec.merge_size,
                                                self.prompts, self.max_question_chars)
        longest = max(len(x) for x in ids)
        if longest > self.max_prefill:
            raise EngineError(f"prompt of {longest} tokens exceeds the engine's prefill maximum {self.max_prefill}; "
                              "rebuild with a larger --prefill-tokens range")
        return pixel_values, grid, ids

    def _prefill(self, ctx: Any, ids: np.ndarray, positions: np.ndarray, past_len: int, src: int, dst: int,
                 image_embeds: np.ndarray | None = None, deepstack: np.ndarray | None = None) -> int:
        """Run `ids` (M-RoPE `positions` [3, len]) after `past_len` cached tokens of KV set `src`
        (the first PAD_SLOTS of them the masked pad slot), writing set `dst`; the next token.
        `image_embeds` replace the image tokens' embeddings (a prompt holding the image)."""
        from vlsi_model.engine.np_inputs import causal_bias, deepstack_at_tokens, mrope_cos_sin

        x = np.array(self.embed_tokens[ids], dtype=self.float_dtype)
        scattered = None
        if image_embeds is not None:
            x[ids == self.image_token_id] = image_embeds.astype(self.float_dtype)
            if self.deepstack_layers:
                scattered = deepstack_at_tokens(ids, self.image_token_id, deepstack, self.deepstack_layers,
                                                self.float_dtype)
        cos, sin = mrope_cos_sin(positions, self.text_inv_freq, self.mrope_section, self.float_dtype,
                                 interleaved=self.mrope_interleaved)
        bias = causal_bias(len(ids), past_len, self.float_dtype, self.mask_value)
        bias[..., :PAD_SLOTS] = self.mask_value
        logits = self._run_decoder(ctx, x[None], cos, sin, bias, past_len, src=src, dst=dst, deepstack=scattered)
        return int(np.argmax(logits))

    def _clear_pad_slot(self) -> None:
        """Zero the pad slot's key/value in KV set 0, the past every prompt's prefill reads."""
        for slot in range(2 * self.num_layers):
            self.cuda.memset(self._kv[0][slot], self.num_kv_heads * PAD_SLOTS * self.head_dim * self.kv_dtype.itemsize)

    def _decode(self, result: AnswerResult, first_id: int, seq_len: int, rope_delta: int, max_new_tokens: int,
                on_token: TokenCallback | None, cancel: threading.Event | None) -> None:
        """The greedy loop after a prompt of `seq_len` tokens whose KV (pad slot included) is in set 1
        and whose prefill chose `first_id`: steps ping-pong between sets 1 and 0. Fills `result`'s
        tokens, text, decode_ms and cancelled. Stops also at the engine's maximum context."""
        from vlsi_model.engine.np_inputs import mrope_cos_sin

        t0 = time.perf_counter()
        src, past_len = 1, seq_len + PAD_SLOTS

        def step(last_id: int, n: int) -> int | None:
            nonlocal src, past_len
            if past_len + 1 > self.max_total:  # the engine's profile ends here
                return None
            pos = np.full((3, 1), seq_len + n - 1 + rope_delta, dtype=np.int64)
            cos, sin = mrope_cos_sin(pos, self.text_inv_freq, self.mrope_section, self.float_dtype,
                                     interleaved=self.mrope_interleaved)
            bias = np.zeros((1, 1, 1, past_len + 1), dtype=self.float_dtype)
            bias[..., :PAD_SLOTS] = self.mask_value
            emb = np.array(self.embed_tokens[[last_id]], dtype=self.float_dtype)[None]
            logits = self._run_decoder(self._decode_ctx, emb, cos, sin, bias, past_len, src=src, dst=1 - src)
            src = 1 - src
            past_len += 1
            return int(np.argmax(logits))

        tokens, result.cancelled = greedy_tokens(first_id, step, self.stop_token_ids, max_new_tokens,
                                                 self.prompts.stream_text, on_token, cancel)
        result.decode_ms = _ms(t0)
        result.token_ids = tokens
        result.text = self.prompts.decode(tokens).strip()

    def answer(self, image: np.ndarray, question: str, max_new_tokens: int = 32,
               on_token: TokenCallback | None = None, cancel: threading.Event | None = None) -> AnswerResult:
        """Greedy answer about `image` (H x W x 3 uint8 RGB) to `question` (same contract as TorchEngine).

        Generation also stops when the engine's maximum context (built into its profiles) is reached.
        """
        from vlsi_model.engine.np_inputs import rope_index

        t_start = time.perf_counter()
        self._check_open()
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pixel_values, grid, (ids,) = self._prompt(image, [question])
        result = AnswerResult(text="")
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            result.total_ms = _ms(t_start)
            return result

        t0 = time.perf_counter()
        image_embeds, deepstack = self._run_vision(pixel_values, grid)
        result.vision_ms = _ms(t0)

        t0 = time.perf_counter()
        positions, rope_delta = rope_index(ids, self.image_token_id, grid, self.vision_spec.merge_size)
        self._clear_pad_slot()
        next_id = self._prefill(self._prefill_ctx, ids, positions, PAD_SLOTS, src=0, dst=1,
                                image_embeds=image_embeds, deepstack=deepstack)
        result.prefill_ms = _ms(t0)
        self._decode(result, next_id, len(ids), rope_delta, max_new_tokens, on_token, cancel)
        result.total_ms = _ms(t_start)
        return result

    def answer_many(self, image: np.ndarray, questions: list[str], max_new_tokens: list[int] | int = 32,
                    cancels: list[threading.Event | None] | None = None) -> list[AnswerResult]:
        """Greedy answers to several questions about one image, sharing what they have in common
        (as the other backends' `answer_many`; the worker groups a camera's waiting questions).

        The frame is resized and encoded once, the prompt's common prefix (the turn's opening, the
        image tokens, whatever the questions share after them) is prefilled once into its own KV
        set (PREFIX_SET), and each question runs only its own tokens through the extend profile,
        reading that set and writing the ping-pong pair its decode steps use: nothing is copied and
        the prefix is never rewritten. A question with more own tokens than that profile takes
        (`max_extend`), and every question on engines built before the extend profile existed, is
        prefilled whole (the vision pass still shared; the prefix set left intact). The first
        result carries the shared preprocessing, vision and prefix times.
        """
        from vlsi_model.engine.np_inputs import rope_index

        t_start = time.perf_counter()
        self._check_open()
        if not questions:
            return []
        limits, cancels = per_question(len(questions), max_new_tokens, cancels, "answer_many")
        if any(n < 1 for n in limits):
            raise EngineError(f"max_new_tokens must be >= 1, got {limits}")
        if len(questions) == 1:
            return [self.answer(image, questions[0], limits[0], cancel=cancels[0])]
        pixel_values, grid, ids = self._prompt(image, questions)  # every question checked before any work
        shared = self._extend_ctx is not None
        prefix = image_prefix_length(ids, self.image_token_id) if shared else 0
        results = [AnswerResult(text="", cancelled=c is not None and c.is_set()) for c in cancels]
        if all(r.cancelled for r in results):
            split_shared_time(results, _ms(t_start))
            return results
        t0 = time.perf_counter()
        image_embeds, deepstack = self._run_vision(pixel_values, grid)
        results[0].vision_ms = _ms(t0)
        t0 = time.perf_counter()
        positions = [rope_index(x, self.image_token_id, grid, self.vision_spec.merge_size) for x in ids]
        if shared:
            self._clear_pad_slot()
            self._prefill(self._prefill_ctx, ids[0][:prefix], positions[0][0][:, :prefix], PAD_SLOTS, src=0,
                          dst=PREFIX_SET, image_embeds=image_embeds, deepstack=deepstack)
        results[0].prefill_ms = _ms(t0)
        for i, (question_ids, (position_ids, rope_delta)) in enumerate(zip(ids, positions, strict=True)):
            result = results[i]
            if result.cancelled or (cancels[i] is not None and cancels[i].is_set()):
                result.cancelled = True
                continue
            t0 = time.perf_counter()
            if shared and len(question_ids) - prefix <= self.max_extend:
                first_id = self._prefill(self._extend_ctx, question_ids[prefix:], position_ids[:, prefix:],
                                         PAD_SLOTS + prefix, src=PREFIX_SET, dst=1)
            else:  # the whole prompt after the pad slot (sets 0 -> 1: the prefix set stays intact)
                self._clear_pad_slot()
                first_id = self._prefill(self._prefill_ctx, question_ids, position_ids, PAD_SLOTS, src=0, dst=1,
                                         image_embeds=image_embeds, deepstack=deepstack)
            result.prefill_ms += _ms(t0)
            self._decode(result, first_id, len(question_ids), rope_delta, limits[i], None, cancels[i])
        split_shared_time(results, _ms(t_start))
        return results

    def warmup(self, width: int = 112, height: int = 112, max_new_tokens: int = 2) -> AnswerResult:
        """Throw-away answers: the first execution of each context pays lazy initialisation (two
        questions about one frame also run the extend context, when the engine has one)."""
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        if self._extend_ctx is not None:
            return self.answer_many(image, ["What is in the image?", "How many objects are there?"],
                                    max_new_tokens)[0]
        return self.answer(image, "What is in the image?", max_new_tokens=max_new_tokens)

    def close(self) -> None:
        """Free device memory and the engines; `answer` raises EngineError afterwards."""
        if self._closed:
            return
        self._closed = True
        self._vision_ctx = self._prefill_ctx = self._decode_ctx = self._extend_ctx = None
        self._vision_engine = self._decoder_engine = None
        self.cuda.close()


# ----------------------------------------------------------------------------- registry hooks
def available(model_path: str | Path, device: str = "cuda") -> bool:
    """Backend registry check: TensorRT installed, a CUDA device asked for, engines next to the model."""
    return tensorrt_available() and device.startswith("cuda") and find_engine_dir(model_path) is not None


def load(model_path: str | Path, device: str = "cuda", engine_dir: str | Path | None = None,
         max_question_chars: int | None = None, is_placeholder: bool | None = None) -> TensorRTEngine:
    """Backend registry loader: engines in `engine_dir`, or found from `model_path` (`find_engine_dir`)."""
    found = find_engine_dir(model_path, engine_dir)
    if found is None:
        from vlsi_model.engine_dirs import ENGINES_ENV, engines_root

        where = engine_dir if engine_dir is not None else (
            f"{model_path}, {Path(model_path) / 'tensorrt'} or this model's set in {engines_root()}")
        raise ModelLoadError(f"no TensorRT engines found in {where}; build them on this device with "
                             "`vlsi build-engine --onnx ONNX_DIR --name NAME` and serve with engine_dir:=NAME "
                             f"(sets are looked up in {engines_root()}; {ENGINES_ENV} moves that folder)")
    if device == "cpu":
        device = "cuda"  # the node's default device; TensorRT only runs on the GPU
    return TensorRTEngine(found, device=device, max_question_chars=max_question_chars or 1000,
                          is_placeholder=is_placeholder)
