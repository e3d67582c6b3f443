"""`vlsi build-engine`: ONNX export -> TensorRT 10 engines + manifest.json, on the device that will run them.

Engines must be built on the target (a Jetson builds its own: engines are specific to the
TensorRT version and GPU), so this module is written against the documented TensorRT 10
Python API and everything that does not need TensorRT is a pure function tested anywhere:
optimisation profile shapes (`compute_profiles`), the equivalent `trtexec` command lines
(`trtexec_commands`), the INT8 readiness check (`has_qdq`) and the manifest. Where TensorRT
is absent the command stops after validating the export with exit status 3
(`EXIT_NO_TENSORRT`), distinct from failures (1), so scripts can run
`vlsi export && vlsi build-engine` everywhere and treat 3 as "build on the Jetson".

Build path (TensorRT 10 Python API):
  builder = trt.Builder(logger); network = builder.create_network(flags)   # explicit batch is
      # the only mode in TRT 10 (the EXPLICIT_BATCH flag is deprecated and implied);
      # flags = STRONGLY_TYPED for an fp16 export or a Q/DQ decoder (types from the ONNX graph)
  parser = trt.OnnxParser(network, logger); parser.parse_from_file(onnx)   # external data ok
  config = builder.create_builder_config()
  config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)
  config.set_flag(trt.BuilderFlag.FP16 / INT8)      # weakly typed fp32 export only
  profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max)
  config.add_optimization_profile(profile)           # decoder: 0 = prefill, 1 = decode, 2 = extend
  config.default_device_type = trt.DeviceType.DLA; config.DLA_core = n
  config.set_flag(trt.BuilderFlag.GPU_FALLBACK)      # with --dla-core
  cache = config.create_timing_cache(bytes); config.set_timing_cache(cache, ignore_mismatch=False)
  plan = builder.build_serialized_network(network, config)

Precision:
- `--fp16` (default). An fp32 export is built weakly typed with BuilderFlag.FP16; the
  layers that lose or overflow in half precision in Qwen2 models (RMSNorm's whole
  normalisation: POW, REDUCE, the SUM adding epsilon, SQRT, the DIV / RECIP; Softmax) are
  pinned to FP32 with PREFER_PRECISION_CONSTRAINTS, and the printed trtexec lines pin the same
  layers (`--layerPrecisions`). An fp16 export (`vlsi export --dtype fp16`, whose graph
  computes norms and softmax in fp32: `graphs._norm`, HF's RMSNorm) is built STRONGLY_TYPED:
  TensorRT follows the ONNX types exactly (TensorRT 10's recommended mode); `--fp32` needs an
  fp32 export. `--dla-core` is checked against the device's DLA count.
- Memory: the plan is written straight from TensorRT's buffer after the parser and network are
  freed (no second host copy of a ~3 GB decoder plan), and read back at load as a read-only
  memory map (no heap copy while TensorRT copies the weights out).
- `--int8` only when asked, and only for an explicitly quantized export (Q/DQ nodes):
  TensorRT 10 deprecates implicit calibration (IInt8Calibrator). The path: export fp32,
  insert QuantizeLinear/DequantizeLinear with a calibration set (e.g. NVIDIA ModelOpt
  `python -m modelopt.onnx.quantization --onnx_path decoder.onnx --quantize_mode int8
  --calibration_data calib.npz`, or onnxruntime.quantization.quantize_static with
  QuantFormat.QDQ), calibration inputs taken from `vlsi data scenes` images run through the
  ONNX Runtime backend; then `vlsi build-engine --int8`.
- Weight-only INT4 / INT8 for the LLM (what puts a 4B model on an 8 GB board) is `vlsi export
  --quantize int4|int8 --quantize-format qdq` (export/quantize.py): its decoder is built
  STRONGLY_TYPED whatever the precision flag (`strongly_typed_graphs`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlsi_model import manifest as mf
from vlsi_model.engine.tensorrt_engine import (
    DECODE_PROFILE,
    DECODER_PROFILE_NAMES,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    ENGINE_MANIFEST,
    EXTEND_PROFILE,
    PAD_SLOTS,
    PREFILL_PROFILE,
    load_tensorrt,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NO_TENSORRT = 3  # TensorRT not installed here: the export was validated, build on the target
PRECISIONS = ("fp16", "int8", "fp32")
DEFAULT_WORKSPACE_MB = 2048  # fits an 8 GB Orin Nano with the model resident; raise on AGX Orin
DEFAULT_EXTRA_PROMPT_TOKENS = 512  # question + template tokens beyond the image in a prompt
DEFAULT_MAX_NEW_TOKENS = 256
EXTEND_MAX_TOKENS = 128  # a question's own tokens (question + turn end) in the decoder's extend profile


class BuildError(RuntimeError):
    """The engines cannot be built; the message says why."""


Range = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeRanges:
    """min/opt/max of the dynamic sizes the engines accept (TensorRT optimisation profiles).

    image_tokens: merged image tokens per image (patches = 4x); prefill_tokens: prompt length
    (image tokens + template + question); max_context: prompt + answer tokens.
    """

    image_tokens: Range
    prefill_tokens: Range
    max_context: int

    def validate(self) -> None:
        for name, (lo, opt, hi) in (("image_tokens", self.image_tokens), ("prefill_tokens", self.prefill_tokens)):
            if not 1 <= lo <= opt <= hi:
                raise BuildError(f"{name} range must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")
        if self.max_context < self.prefill_tokens[2] + 1:
            raise BuildError(f"max_context {self.max_context} must exceed the largest prompt "
                             f"({self.prefill_tokens[2]}) by at least one token")


def default_ranges(export_manifest: dict[str, Any], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> ShapeRanges:
    """Ranges that cover every image the export accepts: opt at the largest image (camera frames
    usually reach the processor's max_pixels), prompts up to DEFAULT_EXTRA_PROMPT_TOKENS beyond it."""
    image = export_manifest["image"]
    unit = int(export_manifest["vision"]["merge_size"]) ** 2
    lo, hi = max(1, int(image["min_patches"]) // unit), max(1, int(image["max_patches"]) // unit)
    prefill = (lo + 1, hi + 24, hi + DEFAULT_EXTRA_PROMPT_TOKENS)
    return ShapeRanges(image_tokens=(lo, hi, hi), prefill_tokens=prefill, max_context=prefill[2] + max_new_tokens)


def _shape(spec: list[Any], sizes: dict[str, int]) -> list[int]:
    out = []
    for d in spec:
        if isinstance(d, str):
            if d not in sizes:
                raise BuildError(f"no size for dynamic axis {d!r}")
            out.append(int(sizes[d]))
        else:
            out.append(int(d))
    return out


def _profile(inputs: dict[str, Any], axes: dict[str, Range]) -> dict[str, dict[str, list[int]]]:
    """{input: {min, opt, max}} for every input with a named (dynamic) axis."""
    prof = {}
    for name, spec in inputs.items():
        if not any(isinstance(d, str) for d in spec["shape"]):
            continue
        prof[name] = {key: _shape(spec["shape"], {a: r[i] for a, r in axes.items()})
                      for i, key in enumerate(("min", "opt", "max"))}
    return prof


def compute_profiles(export_manifest: dict[str, Any], ranges: ShapeRanges) -> dict[str, list[dict[str, Any]]]:
    """Optimisation profiles per graph: vision [one], decoder [prefill, decode, extend] (see tensorrt_engine).

    Prefill: seq tokens with one masked pad slot as past; decode: one token after at least
    the shortest prompt, up to max_context (+ the pad slot); extend: a question's own tokens
    (at most EXTEND_MAX_TOKENS) after a prefix already in the cache (several questions about
    one frame, `answer_many`; a longer question is prefilled whole). The cap keeps the extend
    profile's attention (seq x total) below the prefill's for prompts over ~210 tokens (the
    default ranges allow 513 or more), so the shared scratch buffer does not grow there. Every
    profile's dims agree with each other at min, opt and max (total = past + seq), so each
    point is a shape the graph can run.
    """
    ranges.validate()
    graphs = export_manifest["graphs"]
    unit = int(export_manifest["vision"]["merge_size"]) ** 2
    m = ranges.image_tokens
    vision_axes = {"image_tokens": m, "patches": (m[0] * unit, m[1] * unit, m[2] * unit)}
    s = ranges.prefill_tokens
    prefill_axes = {"seq": s, "past": (PAD_SLOTS,) * 3, "total": (s[0] + PAD_SLOTS, s[1] + PAD_SLOTS, s[2] + PAD_SLOTS)}
    opt_past = min(s[1] + PAD_SLOTS + 16, ranges.max_context)
    decode_axes = {"seq": (1, 1, 1), "past": (s[0] + PAD_SLOTS, opt_past, ranges.max_context),
                   "total": (s[0] + PAD_SLOTS + 1, opt_past + 1, ranges.max_context + 1)}
    cap = min(s[2], EXTEND_MAX_TOKENS)
    ext_seq = (1, min(16, cap), cap)
    ext_past = (PAD_SLOTS + 1, s[1] + PAD_SLOTS, s[2] + PAD_SLOTS)
    ext_total = tuple(a + b for a, b in zip(ext_seq, ext_past, strict=True))
    extend_axes = {"seq": ext_seq, "past": ext_past, "total": ext_total}
    decoder_inputs = graphs["decoder"]["inputs"]
    profiles = {"vision": [_profile(graphs["vision"]["inputs"], vision_axes)],
                "decoder": [None] * len(DECODER_PROFILE_NAMES)}
    profiles["decoder"][PREFILL_PROFILE] = _profile(decoder_inputs, prefill_axes)
    profiles["decoder"][DECODE_PROFILE] = _profile(decoder_inputs, decode_axes)
    profiles["decoder"][EXTEND_PROFILE] = _profile(decoder_inputs, extend_axes)
    if not profiles["vision"][0]:
        profiles["vision"] = []  # fixed image size: static graph, no profile needed
    return profiles


def _shape_arg(profile: dict[str, Any], key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[key])}" for name, shapes in profile.items())


def trtexec_commands(onnx_dir: str | Path, out_dir: str | Path, profiles: dict[str, list[dict[str, Any]]],
                     precision: str = "fp16", workspace_mb: int = DEFAULT_WORKSPACE_MB, dla_core: int | None = None,
                     timing_cache: str | Path | None = None, strongly_typed: bool | dict[str, bool] = False,
                     pinned: dict[str, list[str]] | None = None) -> list[str]:
    """The `trtexec` command lines equivalent to `build_engines` (for debugging on the device, or
    where only trtexec is installed; /usr/src/tensorrt/bin/trtexec on JetPack).

    The decoder's three optimisation profiles are written as `--profile=N` followed by that
    profile's --minShapes/--optShapes/--maxShapes (trtexec's syntax for building several
    profiles; trtexec refuses repeated shape flags without it). trtexec releases that predate
    build-time `--profile` cannot build the multi-profile decoder: use `vlsi build-engine`.
    trtexec writes no manifest.json, so the engines it builds need one written by hand before
    the `tensorrt` backend accepts them. `strongly_typed`: one value for both graphs, or per graph
    (`strongly_typed_graphs`)."""
    cmds = []
    for graph in ("vision", "decoder"):
        args = ["trtexec", f"--onnx={Path(onnx_dir) / f'{graph}.onnx'}",
                f"--saveEngine={Path(out_dir) / f'{graph}.plan'}"]
        if strongly_typed if isinstance(strongly_typed, bool) else strongly_typed[graph]:
            args.append("--stronglyTyped")
        elif precision == "fp16":
            args += ["--fp16", "--precisionConstraints=prefer"]
            names = (pinned or {}).get(graph)
            if names:  # the layers build_engines kept in FP32 (known once the graph was parsed)
                spec = ",".join(f"{n}:fp32" for n in names)
                args += [f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
        elif precision == "int8":
            args += ["--int8", "--fp16"]
        args.append(f"--memPoolSize=workspace:{workspace_mb}M")
        several = len(profiles[graph]) > 1
        for i, prof in enumerate(profiles[graph]):
            args += [f"--profile={i}"] if several else []
            args += [f"--minShapes={_shape_arg(prof, 'min')}", f"--optShapes={_shape_arg(prof, 'opt')}",
                     f"--maxShapes={_shape_arg(prof, 'max')}"]
        if dla_core is not None:
            args += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
        if timing_cache is not None:
            args.append(f"--timingCacheFile={timing_cache}")
        args.append("--skipInference")
        cmds.append(shlex.join(args))
    return cmds


def has_qdq(onnx_path: str | Path) -> bool:
    """True when the graph is explicitly quantized (QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    from vlsi_model.export.trt_ops import iter_nodes

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for _, n in iter_nodes(model))


def onnx_sha256(onnx_dir: str | Path) -> dict[str, str]:
    """sha256 of every graph file (and external data) the engines are built from."""
    out = {}
    for path in sorted(Path(onnx_dir).iterdir()):
        if path.name.endswith((".onnx", ".onnx.data")):
            out[path.name] = mf.sha256_file(path)
    return out


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0: cuda-python, else nvidia-smi, else the Jetson
    device-tree model; `{}` when none answers."""
    try:
        from vlsi_model.engine.tensorrt_engine import _Cuda

        cuda = _Cuda(0)
        try:
            return cuda.gpu_info()
        finally:
            cuda.close()
    except Exception:  # noqa: BLE001 - fall through to the other sources
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
        if out:
            name, cc = (p.strip() for p in out[0].split(","))
            return {"name": name, "compute_capability": cc}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return {"name": model.read_text(errors="replace").strip("\x00 \n"), "compute_capability": "?"}
    return {}


# ----------------------------------------------------------------------------- build (TensorRT)
def _pin_fp32(trt: Any, network: Any) -> list[str]:
    """Keep the half-precision-unsafe layers in FP32 in a weakly typed FP16 build; their names.

    Unsafe: reductions and softmax; and RMSNorm's whole normalisation, not only its mean of
    squares: pow, the sum that adds epsilon to a reduction's output, sqrt and the division (or
    reciprocal) by it, which in fp16 lose the small variances of near-constant channels."""
    reduce_outputs: set[str] = set()
    pinned: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        unsafe = layer.type in (trt.LayerType.REDUCE, trt.LayerType.SOFTMAX)
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # the documented downcast to read `op`
            op = layer.op
            inputs = {layer.get_input(k).name for k in range(layer.num_inputs) if layer.get_input(k) is not None}
            unsafe = op in (trt.ElementWiseOperation.POW, trt.ElementWiseOperation.DIV) or (
                op == trt.ElementWiseOperation.SUM and bool(inputs & reduce_outputs))
        elif layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            unsafe = layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP)
        if layer.type == trt.LayerType.REDUCE:
            reduce_outputs.update(layer.get_output(j).name for j in range(layer.num_outputs))
        if unsafe:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def _write_plan(plan: Any, plan_path: Path) -> tuple[int, str]:
    """Write the serialized engine straight from TensorRT's buffer (`bytes(plan)` would make a
    second host copy: ~2.9 GB for a 2B decoder); returns (size, sha256) computed on the way."""
    import hashlib

    view = memoryview(plan)
    digest = hashlib.sha256()
    with open(plan_path, "wb") as f:
        for start in range(0, view.nbytes, 1 << 24):
            chunk = view[start:start + (1 << 24)]
            f.write(chunk)
            digest.update(chunk)
    return view.nbytes, digest.hexdigest()


def strongly_typed_graphs(em: dict[str, Any], precision: str) -> dict[str, bool]:
    """Which graphs of an export are built STRONGLY_TYPED: both for an fp16 export (its types are
    the precision), and the decoder of a weight-only Q/DQ export whatever its dtype (explicit
    quantization: TensorRT 10 takes the INT4 / INT8 weights from the graph's DequantizeLinear types;
    an fp32 export then computes its GEMMs in fp32, so export Q/DQ for TensorRT with --dtype fp16)."""
    fp16 = em.get("dtype") == "fp16" and precision != "int8"
    qdq = (em.get("quantization") or {}).get("format") == "QDQ"
    return {"vision": fp16, "decoder": fp16 or qdq}


def build_engine_file(trt: Any, onnx_path: Path, plan_path: Path, profiles: list[dict[str, Any]], precision: str,
                      strongly_typed: bool, workspace_mb: int, dla_core: int | None,
                      timing_cache: Path | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Parse one ONNX graph and write its serialized engine; returns build facts for the manifest."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if dla_core is not None and not 0 <= dla_core < int(builder.num_DLA_cores):
        raise BuildError(f"--dla-core {dla_core}: this device has {builder.num_DLA_cores} DLA cores (Orin Nano and "
                         "Orin NX 8 GB have none)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    pinned: list[str] = []
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            pinned = _pin_fp32(trt, network)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if dla_core is not None:
        # Dynamic shapes and most of these layers are not DLA-capable: expect GPU fallback.
        say(f"DLA core {dla_core} with GPU fallback (layers the DLA cannot run stay on the GPU)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for k, prof in enumerate(profiles):
        p = builder.create_optimization_profile()
        for name, shapes in prof.items():
            p.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        if config.add_optimization_profile(p) < 0:
            raise BuildError(f"TensorRT refused optimisation profile {k} of {onnx_path.name}: {prof}")
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    say(f"building {plan_path.name} from {onnx_path.name} ({precision}{', strongly typed' if strongly_typed else ''})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build {plan_path.name} (see the TensorRT log above)")
    del parser, network  # the ONNX weights they hold are not needed to write the plan
    size, sha256 = _write_plan(plan, plan_path)
    del plan
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": plan_path.name, "onnx": onnx_path.name, "build_seconds": round(time.perf_counter() - t0, 1),
            "size_bytes": size, "sha256": sha256, "fp32_pinned_layers": len(pinned),
            "fp32_pinned_layer_names": pinned, "profiles": profiles}


def build_engines(onnx_dir: str | Path, out_dir: str | Path, precision: str = "fp16",
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, dla_core: int | None = None,
                  timing_cache: str | Path | None = None, ranges: ShapeRanges | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build vision + decoder engines from an export into `out_dir` with manifest.json.

    Raises TensorRTUnavailable where TensorRT is absent (after the caller validated the export),
    BuildError for a failed build or a bad request.
    """
    say = progress or print
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    em = mf.load_manifest(onnx_dir)
    if (em.get("quantization") or {}).get("format") == "MatMulNBits":
        raise BuildError(f"{onnx_dir} is quantized for ONNX Runtime (com.microsoft.MatMulNBits), which TensorRT "
                         "cannot parse; export again with --quantize-format qdq (the Q/DQ form TensorRT builds) "
                         "or without --quantize")
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" and em.get("dtype") == "fp16":
        raise BuildError(f"{onnx_dir} is an fp16 export: its graph computes in fp16 whatever the build flags, so "
                         "fp32 engines need an fp32 export (vlsi export --dtype fp32)")
    if precision == "int8":
        missing = [g for g in (mf.VISION_FILE, mf.DECODER_FILE) if not has_qdq(onnx_dir / g)]
        if missing:
            raise BuildError(f"--int8 needs an explicitly quantized export (Q/DQ nodes); {', '.join(missing)} "
                             "have none. See `vlsi_model/export/tensorrt_build.py` (ModelOpt / quantize_static QDQ).")
    ranges = ranges or default_ranges(em)
    profiles = compute_profiles(em, ranges)
    strongly_typed = strongly_typed_graphs(em, precision)
    if strongly_typed["decoder"] and em.get("dtype") != "fp16":
        say("note: the decoder's weights are Q/DQ quantized and the export is fp32, so its GEMMs run in fp32 with "
            "dequantized weights; an fp16 export (vlsi export --dtype fp16 --quantize ... --quantize-format qdq) "
            "runs them in fp16")
    trt = load_tensorrt()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache is not None else None
    t0 = time.perf_counter()
    engines = {}
    for graph, file in (("vision", mf.VISION_FILE), ("decoder", mf.DECODER_FILE)):
        engines[graph] = build_engine_file(trt, onnx_dir / file, out_dir / f"{graph}.plan", profiles[graph],
                                           precision, strongly_typed[graph], workspace_mb, dla_core, cache, say)
    engines["decoder"]["profile_names"] = list(DECODER_PROFILE_NAMES[:len(profiles["decoder"])])
    copied = {}
    for name in [mf.MANIFEST_FILE, em["files"]["embed_tokens"], em["files"]["rope"], *em["files"].get("copied", [])]:
        if (onnx_dir / name).is_file():
            shutil.copy2(onnx_dir / name, out_dir / name)
            copied[name] = mf.sha256_file(out_dir / name)
    manifest = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "model_name": em.get("model_name"),
        "tensorrt_version": str(trt.__version__),
        "gpu": gpu_info(),
        "precision": precision,
        "strongly_typed": strongly_typed,
        "weights": (em.get("quantization") or {}).get("scheme", em.get("dtype")),
        "workspace_mb": workspace_mb,
        "dla_core": dla_core,
        "ranges": {"image_tokens": list(ranges.image_tokens), "prefill_tokens": list(ranges.prefill_tokens),
                   "max_context": ranges.max_context},
        "pad_slots": PAD_SLOTS,
        "engines": engines,
        "copied_sha256": copied,  # checked at load with the plans' sizes and hashes (check_engine_files)
        "source_export": {"dir": str(onnx_dir.resolve()), "onnx_sha256": onnx_sha256(onnx_dir),
                          "export_manifest_sha256": mf.sha256_file(onnx_dir / mf.MANIFEST_FILE)},
        "created_unix": int(time.time()),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "trtexec": trtexec_commands(onnx_dir, out_dir, profiles, precision, workspace_mb, dla_core, timing_cache,
                                    strongly_typed,
                                    pinned={g: e.get("fp32_pinned_layer_names", []) for g, e in engines.items()}),
    }
    tmp = out_dir / (ENGINE_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / ENGINE_MANIFEST)
    return manifest
