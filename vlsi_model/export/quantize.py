"""Weight-only int8 / int4 quantization of an ONNX export (`vlsi export --quantize`).

Why: decoding a token reads every weight of the language model once, so on a memory-bound
board (a Jetson, a CPU) decode speed follows the bytes of the weights; int8 halves them
against fp16 and int4 quarters them. Weights only: no calibration data, and the accuracy cost
is small and measured (`vlsi eval` on the quantized export).

Why `accuracy_level` 4 by default: it lets ONNX Runtime's MatMulNBits kernel quantize each block
of activations to int8 on the fly and use its integer dot-product path. Measured at Qwen2-VL-2B
size on 2 CPU cores (2026-12-05, docs/benchmarks.md): int4 decode 19.5 -> 32.7 tokens/s (75% of
the bandwidth bound) and int8 0.3 -> 22.5 tokens/s (without it, 8-bit weights take a slow
fallback kernel). The
answers it costs on the shipped student are measured beside the float-activation ones
(docs/inference.md); `accuracy_level` 0 keeps float activations.

Why onnxruntime's tools and not hand-written kernels: `MatMulNBitsQuantizer` quantizes every
MatMul whose weight is a constant, block-wise along the input dimension (`block_size` weights
share one scale, asymmetric), into `com.microsoft.MatMulNBits` nodes: ONNX Runtime's fused
dequantize-matmul kernels (CPU and CUDA), what the onnxruntime backend runs.

Two forms (`fmt`):
- "matmulnbits" (default): `com.microsoft.MatMulNBits`, asymmetric, ONNX Runtime's fused kernels;
  TensorRT cannot parse it.
- "qdq": weight-only explicit quantization as TensorRT 10 builds it: each quantized weight is a
  constant `DequantizeLinear` feeding the unchanged `MatMul`. TensorRT's parser (onnx-tensorrt
  10.x `onnxOpImporters.cpp`) takes only symmetric Q/DQ (zero point absent or all zeros), blocked
  scales only for INT4 and along one axis, and INT4 only with an even last dimension; so INT4 is
  block-wise symmetric along the input dimension (`MatMulNBitsQuantizer` with `QuantFormat.QDQ`,
  which writes a true INT4 initializer and raises the graph to opset 21, the first with INT4
  blocked `DequantizeLinear`), and INT8 is per output channel (`_int8_per_channel_qdq`, raised to
  opset 21 too: fp16 scales need DequantizeLinear-19). Scales are
  round-to-nearest from the weights alone; AWQ would change the values (it needs calibration
  activations), not this form. The lm_head stays in the export's float dtype, as NVIDIA
  ModelOpt's ONNX quantizers leave it by default (`nodes_to_exclude=['/lm_head']`): on the
  shipped student INT4 with a float lm_head scores 0.8276 on the test split against 0.8224 with
  it quantized (fp32 0.8319; docs/inference.md). The graph must be exported at opset 18: raising
  an opset-17 graph breaks its ReduceMean / Squeeze nodes (their `axes` moved from attribute to
  input in opset 18), while opsets 19-21 changed none of the operators our graphs use beyond
  adding types. ONNX Runtime runs the Q/DQ form too, so its accuracy is
  measured here on CPU before any board sees it.

Only the text decoder is quantized by default: it is what every generated token reads; the
vision tower runs once per image and is small next to it (`include_vision=True` quantizes it too).
The token-embedding table (`embed_tokens.npy`) stays in the export's float dtype.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from vlsi_model import manifest as mf

BITS = {"int8": 8, "int4": 4}
FORMATS = ("matmulnbits", "qdq")
DEFAULT_BLOCK_SIZE = 32  # MatMulNBits
DEFAULT_QDQ_BLOCK_SIZE = 128  # INT4 Q/DQ: ModelOpt's INT4 default for TensorRT (fewer scales to read per GEMM)


class QuantizeError(RuntimeError):
    """The quantization cannot be done as asked; the message says why."""


DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (see the module docstring)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime's: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8


def _graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


QDQ_OPSET = 21  # INT4 DequantizeLinear (and fp16 scales, from 19)
LM_HEAD_NODE = "/lm_head/MatMul"  # the lm_head's MatMul in our decoder graphs (graphs.py: self.lm_head)


def _raise_opset(model: Any, opset: int) -> None:
    """Declare the default-domain opset `opset` (and IR version 10, which opset 21 needs): our
    opset-18 graphs mean the same there (module docstring); onnx.checker verifies the result."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    model.ir_version = max(model.ir_version, 10)


def _int8_per_channel_qdq(model: Any, exclude: tuple[str, ...] = ()) -> int:
    """Replace every constant 2-D MatMul weight of `model` by int8 + per-output-channel scale +
    `DequantizeLinear(axis=1)`, in place; returns how many were replaced.

    Why by hand: onnxruntime's weight-only tool writes 8-bit weights only as MatMulNBits, and its
    `quantize_static` Q/DQ form quantizes activations too (calibration data, and not weight-only).
    Symmetric (no zero point: TensorRT takes no other), scale = max |w| over the input dimension / 127.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    replaced = 0
    new_nodes = []
    for node in model.graph.node:
        weight = (inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2
                  and node.name not in exclude else None)
        if weight is None or len(weight.dims) != 2 or uses[weight.name] != 1 or weight.data_type not in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = weight.name
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_DQ_Q8"),
            numpy_helper.from_array(scale.astype(helper.tensor_dtype_to_np_dtype(weight.data_type)),
                                    f"{base}_DQ_scales")])
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_DQ_Q8", f"{base}_DQ_scales"],
                                          [f"{base}_DQ_output"], name=f"{node.name}_DQ", axis=1))
        node.input[1] = f"{base}_DQ_output"
        new_nodes.append(node)
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return replaced


def quantize_graph(path: Path, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL, fmt: str = "matmulnbits",
                   exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Quantize the MatMul weights of the ONNX graph at `path` in place, but for the MatMul nodes
    named in `exclude`; returns what was done."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    if bits not in (4, 8):
        raise QuantizeError(f"bits must be 4 or 8, got {bits}")
    if fmt not in FORMATS:
        raise QuantizeError(f"format must be one of {FORMATS}, got {fmt!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizeError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size}")
    model = onnx.load(str(path))
    if fmt == "qdq" and model.opset_import[0].version < 18:
        raise QuantizeError(f"{path.name} is opset {model.opset_import[0].version}: the Q/DQ form needs a graph "
                            "exported at opset 18 (vlsi export --opset 18)")
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    bytes_before = _graph_bytes(path)
    missing = set(exclude) - {n.name for n in model.graph.node}
    if missing:
        raise QuantizeError(f"{path.name} has no node {', '.join(sorted(missing))} to keep in float")
    if fmt == "qdq" and bits == 8:
        _int8_per_channel_qdq(model, exclude)
        _raise_opset(model, QDQ_OPSET)  # fp16 scales need DequantizeLinear-19+; one opset for both widths
        quantized = model
    else:
        # the tool logs every node it visits at INFO and warns that raising the opset may give an invalid
        # model: export_model runs the full onnx.checker on the result
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=fmt == "qdq", nodes_to_exclude=list(exclude),
            accuracy_level=(accuracy_level or None) if fmt == "matmulnbits" else None,
            quant_format=QuantFormat.QOperator if fmt == "matmulnbits" else QuantFormat.QDQ)
        quantizer.process()
        quantized = quantizer.model.model
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    data = path.with_name(path.name + ".data")
    if data.is_file():
        data.unlink()
    big = sum(t.ByteSize() for t in quantized.graph.initializer) > (1 << 30)
    onnx.save_model(quantized, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    quantized_nodes = counts.get("MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear", 0)
    if quantized_nodes == 0:
        raise QuantizeError(f"{path.name}: no MatMul with a constant weight was quantized ({before} MatMul nodes)")
    return {"matmuls": before, "quantized": quantized_nodes, "bytes_before": bytes_before,
            "bytes_after": _graph_bytes(path), "opset": quantized.opset_import[0].version}


def quantize_export(export_dir: str | Path, bits: int, block_size: int | None = None,
                    include_vision: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                    fmt: str = "matmulnbits") -> dict[str, Any]:
    """Quantize an export's graphs in place and record it in its manifest (`quantization`).

    `block_size` None: 32 for MatMulNBits, 128 for INT4 Q/DQ; INT8 Q/DQ is per channel (no blocks)."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / mf.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("quantization"):
        raise QuantizeError(f"{export_dir} is quantized already ({manifest['quantization']['scheme']})")
    if block_size is None:
        block_size = DEFAULT_QDQ_BLOCK_SIZE if fmt == "qdq" else DEFAULT_BLOCK_SIZE
    t0 = time.perf_counter()
    graphs = [mf.DECODER_FILE] + ([mf.VISION_FILE] if include_vision else [])
    done = {name: quantize_graph(export_dir / name, bits, block_size, accuracy_level, fmt,
                                 exclude=(LM_HEAD_NODE,) if fmt == "qdq" and name == mf.DECODER_FILE else ())
            for name in graphs}
    if fmt == "qdq":
        granularity = f"block {block_size} along the input dimension" if bits == 4 else "per output channel"
        manifest["quantization"] = {
            "scheme": f"int{bits} weight-only, {granularity}, symmetric, Q/DQ (DequantizeLinear + MatMul), "
                      "lm_head in float",
            "bits": bits, "block_size": block_size if bits == 4 else None, "format": "QDQ", "graphs": done,
            "tensorrt": "explicit quantization: engines are built strongly typed (types from the graph)",
        }
    else:
        activations = "int8 activations in the kernel" if accuracy_level == 4 else "float activations"
        manifest["quantization"] = {
            "scheme": f"int{bits} weight-only, block {block_size}, asymmetric, {activations}",
            "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level, "format": "MatMulNBits",
            "graphs": done,
            "tensorrt": "not parseable (com.microsoft.MatMulNBits): export with --quantize-format qdq",
        }
    manifest["quantization"]["seconds"] = round(time.perf_counter() - t0, 2)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest["quantization"]
