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

Not yet for TensorRT: the same tool's Q/DQ form (block-wise `DequantizeLinear` + `MatMul`, what
TensorRT 10 builds weight-only INT4 engines from) needs opset 21, and turning our opset-17 graphs
into it breaks their ReduceMean / Squeeze nodes (their `axes` moved from attribute to input in
opset 18); TensorRT 10.3's parser reads opsets 9-20. Measured 2026-12-05; an opset-21 export path
is the missing piece. A quantized export is therefore for ONNX Runtime (its manifest says so).

Only the text decoder is quantized by default: it is what every generated token reads; the
vision tower runs once per image and is small next to it (`include_vision=True` quantizes it too).
The token-embedding table (`embed_tokens.npy`) stays in the export's float dtype.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlsi_model import manifest as mf

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32


class QuantizeError(RuntimeError):
    """The quantization cannot be done as asked; the message says why."""


DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (see the module docstring)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime's: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8


def quantize_graph(path: Path, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, Any]:
    """Quantize the MatMul weights of the ONNX graph at `path` in place; returns what was done."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    if bits not in (4, 8):
        raise QuantizeError(f"bits must be 4 or 8, got {bits}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizeError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size}")
    model = onnx.load(str(path))
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    bytes_before = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size
                                          if path.with_name(path.name + ".data").is_file() else 0)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level or None, quant_format=QuantFormat.QOperator)
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
    bytes_after = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    quantized_nodes = counts.get("MatMulNBits", 0)
    if quantized_nodes == 0:
        raise QuantizeError(f"{path.name}: no MatMul with a constant weight was quantized ({before} MatMul nodes)")
    return {"matmuls": before, "quantized": quantized_nodes, "bytes_before": bytes_before,
            "bytes_after": bytes_after}


def quantize_export(export_dir: str | Path, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                    include_vision: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, Any]:
    """Quantize an export's graphs in place and record it in its manifest (`quantization`)."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / mf.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("quantization"):
        raise QuantizeError(f"{export_dir} is quantized already ({manifest['quantization']['scheme']})")
    t0 = time.perf_counter()
    graphs = [mf.DECODER_FILE] + ([mf.VISION_FILE] if include_vision else [])
    done = {name: quantize_graph(export_dir / name, bits, block_size, accuracy_level) for name in graphs}
    activations = "int8 activations in the kernel" if accuracy_level == 4 else "float activations"
    manifest["quantization"] = {
        "scheme": f"int{bits} weight-only, block {block_size}, asymmetric, {activations}",
        "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level, "format": "MatMulNBits",
        "graphs": done,
        "tensorrt": "not parseable (com.microsoft.MatMulNBits): build engines from an unquantized export",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest["quantization"]
