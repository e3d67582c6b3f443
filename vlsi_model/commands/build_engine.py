"""`vlsi build-engine`: TensorRT 10 engines from an ONNX export (`vlsi export`), on the target device.

Builds vision.plan and decoder.plan (decoder profiles: prefill, decode, extend) into a named
engine set, `trt_engines/NAME/` (NAME: --name, default the model's name, e.g. `my_robot` for
`runs/my_robot/final`; `VLSI_TRT_ENGINES` moves the folder; a set of another model is not
overwritten without --overwrite), or into --out, with manifest.json (TensorRT version, GPU and compute capability,
precision, profile shapes, sha256 of the ONNX inputs) and the export's tokenizer/embedding files,
so that folder is all the `tensorrt` backend needs
(`ros2 launch vlsi_ros vqa.launch.py backend:=tensorrt engine_dir:=NAME`).
The equivalent `trtexec` commands are printed first.

Exit status: 0 built; 3 TensorRT is not installed here (the export was checked and the
trtexec commands printed: build on the Jetson); 2 bad options or export directory; 1 the
build failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlsi_model.commands._common import non_negative_int
from vlsi_model.engine_dirs import engine_set_name, named_engine_dir, set_source
from vlsi_model.export.tensorrt_build import (
    DEFAULT_WORKSPACE_MB,
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_NO_TENSORRT,
    EXIT_OK,
)


def _range(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.replace(":", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return parts[0], parts[1], parts[2]


def default_engine_name(onnx_dir: Path, export_manifest: dict) -> str:
    """The engine set's name without --name: the model's (`engine_dirs.engine_set_name` of the
    directory the export came from: `runs/my_robot/final` -> my_robot), else the export folder's."""
    source = export_manifest.get("source_dir")
    return engine_set_name(source or onnx_dir, export_manifest.get("model_name"))


def another_models_set(out: Path, export_manifest: dict) -> str | None:
    """Why building into `out` would replace something else (None when it would not): `out` holds
    a set exported from a different model directory, or is a non-empty folder that is no engine set."""
    old, new = set_source(out), export_manifest.get("source_dir")
    if old and new and Path(old).resolve() != Path(new).resolve():
        return f"{out} holds the engines of {old}, not of {new}"
    if old is None and out.is_dir() and any(out.iterdir()):
        return f"{out} is a non-empty folder that holds no engine set"
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `build-engine` to the `vlsi` parser."""
    p = subparsers.add_parser("build-engine", help="build TensorRT engines from an ONNX export",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, type=Path, help="export directory written by `vlsi export`")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--name", default=None,
                       help="engine set name: engines go to trt_engines/NAME (default: the model's name), "
                            "served with engine_dir:=NAME")
    where.add_argument("--out", type=Path, default=None, help="engine directory (instead of a named set)")
    p.add_argument("--overwrite", action="store_true",
                   help="build into a set that holds another model's engines (default: refused)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="half precision (default; norms and softmax kept in fp32)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="INT8 from an explicitly quantized (Q/DQ) export only; see tensorrt_build.py")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="full precision")
    p.set_defaults(precision="fp16")
    p.add_argument("--workspace-mb", type=non_negative_int, default=DEFAULT_WORKSPACE_MB,
                   help=f"builder workspace memory pool (default {DEFAULT_WORKSPACE_MB} MB)")
    p.add_argument("--dla-core", type=non_negative_int, default=None,
                   help="build for this DLA core with GPU fallback (Jetson Orin AGX/NX)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file: loaded if it exists, saved after the build (faster rebuilds)")
    p.add_argument("--image-tokens", type=_range, default=None, metavar="MIN,OPT,MAX",
                   help="merged image tokens per image (default: the export's image limits)")
    p.add_argument("--prefill-tokens", type=_range, default=None, metavar="MIN,OPT,MAX",
                   help="prompt length in tokens (default: image tokens + up to 512)")
    p.add_argument("--max-context", type=non_negative_int, default=None,
                   help="prompt + answer tokens (default: largest prompt + 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlsi_model import manifest as mf
    from vlsi_model.engine.tensorrt_engine import TensorRTUnavailable, tensorrt_available
    from vlsi_model.errors import ModelLoadError
    from vlsi_model.export.tensorrt_build import (
        BuildError,
        build_engines,
        compute_profiles,
        default_ranges,
        strongly_typed_graphs,
        trtexec_commands,
    )

    try:
        em = mf.load_manifest(args.onnx)
        ranges = default_ranges(em)
        if args.image_tokens:
            ranges = replace(ranges, image_tokens=args.image_tokens)
        if args.prefill_tokens:
            ranges = replace(ranges, prefill_tokens=args.prefill_tokens)
        if args.max_context:
            ranges = replace(ranges, max_context=args.max_context)
        elif args.prefill_tokens:
            ranges = replace(ranges, max_context=ranges.prefill_tokens[2] + 256)
        profiles = compute_profiles(em, ranges)
    except (ModelLoadError, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        name = args.name if args.name is not None else default_engine_name(args.onnx, em)
        out = args.out if args.out is not None else named_engine_dir(name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    clash = another_models_set(out, em)
    if clash and not args.overwrite:
        print(f"error: {clash}; choose another --name, or pass --overwrite to replace them", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:  # the export must be sound before anyone spends an hour building on a Jetson
        from vlsi_model.export.onnx_export import check_graphs

        check_graphs(args.onnx)
    except ImportError:
        pass  # onnx not installed on a TensorRT-only device: TensorRT's parser checks instead
    except Exception as exc:  # ExportError (checker/op set)
        print(f"error: the export in {args.onnx} fails its checks: {exc}", file=sys.stderr)
        return EXIT_ERROR

    strongly_typed = strongly_typed_graphs(em, args.precision)
    print("# equivalent trtexec commands:")
    for cmd in trtexec_commands(args.onnx, out, profiles, args.precision, args.workspace_mb, args.dla_core,
                                args.timing_cache, strongly_typed):
        print(cmd)
    sys.stdout.flush()

    if not tensorrt_available():
        print(f"TensorRT is not installed here: the export in {args.onnx} is valid, engines were NOT built. "
              f"Run this command on the target (Jetson, JetPack 6.1+ / TensorRT 10) to build them "
              f"(exit status {EXIT_NO_TENSORRT}).", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        manifest = build_engines(args.onnx, out, precision=args.precision, workspace_mb=args.workspace_mb,
                                 dla_core=args.dla_core, timing_cache=args.timing_cache, ranges=ranges,
                                 progress=lambda msg: print(msg, file=sys.stderr))
    except TensorRTUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    except (BuildError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    served_as = out.name if args.out is None else str(out)
    print(f"serve with: ros2 launch vlsi_ros vqa.launch.py model_path:={em.get('source_dir', '<model>')} "
          f"backend:=tensorrt engine_dir:={served_as}", file=sys.stderr)
    print(json.dumps({"out": str(out), "tensorrt": manifest["tensorrt_version"], "gpu": manifest["gpu"],
                      "precision": manifest["precision"], "seconds": manifest["build_seconds"]}))
    return EXIT_OK
