"""`vlsi export`: ONNX graphs of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model for ONNX Runtime and TensorRT.

Writes vision.onnx, decoder.onnx (prefill + decode with KV cache), the embedding table, the
tokenizer/preprocessor files and export_manifest.json into --out (default <model>/onnx,
where `--backend auto` finds it). Every graph is checked with onnx.checker, against
TensorRT 10's operator set, and for parity with PyTorch through ONNX Runtime.
Sizes are HEIGHTxWIDTH in pixels. Exit status: 0 exported, 2 bad options or model
directory, 1 a failed check or other error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlsi_model.commands._common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, apply_torch_threads


def _hw(text: str) -> tuple[int, int]:
    from vlsi_model.export.onnx_export import parse_hw

    try:
        return parse_hw(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `export` to the `vlsi` parser."""
    p = subparsers.add_parser("export", help="export a model to ONNX (vision, decoder, embeddings)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory (default: the shipped student, or the placeholder)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <model>/onnx)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=_hw, default=None, metavar="HxW",
                      help="fixed input size (multiples of patch x merge size: 28 px, 32 for Qwen3-VL): every "
                           "image is resized to it; static vision graph, the fastest TensorRT engine")
    size.add_argument("--max-image-size", type=_hw, default=None, metavar="HxW",
                      help="bound the pixel count to H*W (images keep their aspect ratio; only narrows the "
                           "image processor's max_pixels, which is the default bound)")
    p.add_argument("--opset", type=int, choices=(17, 18), default=None,
                   help="ONNX opset (default 17; 18 with --quantize-format qdq, which raises the INT4 decoder to 21)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="graph precision (default fp32, fp16 with --quantize-format qdq: TensorRT's INT4 / INT8 "
                        "weight-only GEMMs take fp16 activations; fp16 halves the files and gives strongly typed "
                        "TensorRT builds)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript: ~20x faster here; see onnx_export.py)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization of the decoder's weights (see --quantize-format)")
    p.add_argument("--quantize-format", choices=("matmulnbits", "qdq"), default=None,
                   help="matmulnbits (default): ONNX Runtime's fused kernels, asymmetric blocks, fastest on CPU; "
                        "qdq: DequantizeLinear + MatMul, symmetric (INT4 blocks, INT8 per channel), what "
                        "TensorRT 10 builds engines from (vlsi build-engine); ONNX Runtime runs it too")
    p.add_argument("--block-size", type=int, default=None,
                   help="weights per INT4 / MatMulNBits scale (default 32 for matmulnbits, 128 for qdq)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="ONNX Runtime MatMulNBits compute: 4 (default) quantizes activations to int8 in the "
                        "kernel, the fast CPU path (2B size: int4 decode 1.7x, int8 75x); 0 keeps them float")
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlsi_model.defaults import default_model_path
    from vlsi_model.errors import ModelLoadError
    from vlsi_model.export.onnx_export import (
        ExportError,
        ExportOptions,
        ExportOptionsError,
        UnsupportedModelError,
        export_model,
    )

    apply_torch_threads(args.threads)
    model = args.model if args.model is not None else default_model_path()
    out = args.out if args.out is not None else Path(model) / "onnx"
    if args.quantize_format is not None and args.quantize is None:
        print("error: --quantize-format needs --quantize int8|int4", file=sys.stderr)
        return EXIT_BAD_INPUT
    qdq = args.quantize_format == "qdq"
    opset = args.opset if args.opset is not None else (18 if qdq else 17)
    dtype = args.dtype or ("fp16" if qdq else "fp32")
    options = ExportOptions(image_size=args.image_size, max_image_size=args.max_image_size, opset=opset,
                            dtype=dtype, exporter=args.exporter, check_parity=not args.no_parity,
                            quantize=args.quantize, quantize_block_size=args.block_size,
                            quantize_accuracy_level=args.accuracy_level,
                            quantize_format=args.quantize_format or "matmulnbits")
    try:
        manifest = export_model(model, out, options, overwrite=args.overwrite,
                                progress=lambda msg: print(msg, file=sys.stderr))
    except (ModelLoadError, ExportOptionsError, UnsupportedModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps({"out": str(out), "model": manifest["model_name"], "model_type": manifest["model_type"],
                      "opset": manifest["opset"], "dtype": manifest["dtype"], "image": manifest["image"]["mode"],
                      "parity": manifest.get("parity"), "seconds": manifest.get("export_seconds"),
                      **({"quantization": {k: v for k, v in manifest["quantization"].items() if k != "parity"}}
                         if manifest.get("quantization") else {})}))
    return EXIT_OK
