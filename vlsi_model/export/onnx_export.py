"""`vlsi export`: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model directory -> ONNX graphs + everything to run them.

Qwen3-VL's DeepStack crosses the two graphs: the vision graph also returns the features of
its DeepStack blocks, the runtime scatters them to the image tokens' positions, and the
decoder graph adds them to its first layers' outputs (`graphs.Qwen3VisionGraph`, the
`deepstack_embeds` input of `graphs.DecoderGraph`).

What is written, and why in this shape (see `manifest` for the directory layout):

- `vision.onnx` (`graphs.VisionGraph`): dynamic patch count (or a fixed image size with
  `image_size`, the fastest choice for TensorRT); rotary tables, attention segments and
  Qwen2.5-VL's window permutation are inputs computed by numpy outside the graph.
- `decoder.onnx` (`graphs.DecoderGraph`): one graph for prefill (past length 0, S tokens)
  and decode (S = 1, past of any length), so the weights are stored and loaded once.
- `embed_tokens.npy`: the embedding table; the runtime builds inputs_embeds by indexing it
  (memory-mapped, so only rows in use are paged in), no embed graph needed.
- tokenizer / preprocessor / config files copied beside, and `export_manifest.json`.

Every graph is checked with `onnx.checker` (full check with shape inference), against
TensorRT 10's operator set (`trt_ops`), and run once through ONNX Runtime against the
PyTorch model (vision embeddings, prefill logits, one decode step); the differences are
recorded in the manifest and the export fails when they exceed the tolerance.

Exporter: the TorchScript-based `torch.onnx.export(dynamo=False)` by default. It is ~20x
faster than the dynamo exporter on these graphs (1 s vs 19 s for the tiny decoder on 2 CPU
cores), names dynamic axes, and emits only plain opset-17/18 operators; the wrappers have
no data-dependent control flow, which is what the dynamo exporter would add value for.
`exporter="dynamo"` is available and tested (slow test) for when the legacy path is gone.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model import manifest as mf
from vlsi_model.fileio import readable_as_umask_allows, replace_directory

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = (17, 18)
DTYPES = ("fp32", "fp16")
EXPORTERS = ("torchscript", "dynamo")
# Parity tolerances (max abs difference vs PyTorch) the export must meet.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
# Above this many bytes of weights a graph is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1 << 30


class ExportError(RuntimeError):
    """The export cannot be done or its result failed a check; the message says which."""


class ExportOptionsError(ExportError):
    """Bad options (sizes, opset, dtype) or an output directory that exists: the user's to fix."""


class UnsupportedModelError(ExportError):
    """The model's architecture has no ONNX export (yet): see manifest.EXPORTABLE_MODEL_TYPES."""


@dataclass(frozen=True)
class ExportOptions:
    """`image_size` (H, W): fixed input size (static vision graph); `max_image_size` (H, W): bound on
    the pixel count (dynamic vision graph up to that many patches). Neither: the processor's own
    max_pixels bounds it."""

    image_size: tuple[int, int] | None = None
    max_image_size: tuple[int, int] | None = None
    opset: int = 17
    dtype: str = "fp32"
    exporter: str = "torchscript"
    check_parity: bool = True
    quantize: str | None = None  # "int8" | "int4": weight-only, block-wise (export/quantize.py)
    quantize_block_size: int | None = None  # None: the format's default (quantize.quantize_export)
    quantize_accuracy_level: int = 4  # quantize.DEFAULT_ACCURACY_LEVEL: int8 activations in MatMulNBits
    quantize_format: str = "matmulnbits"  # or "qdq": the Q/DQ form TensorRT builds (needs opset 18)

    def validate(self, factor: int) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportOptionsError(f"opset must be one of {SUPPORTED_OPSETS}, got {self.opset}")
        if self.dtype not in DTYPES:
            raise ExportOptionsError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.exporter not in EXPORTERS:
            raise ExportOptionsError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        from vlsi_model.export.quantize import BITS, FORMATS

        if self.quantize is not None and self.quantize not in BITS:
            raise ExportOptionsError(f"quantize must be one of {', '.join(BITS)}, got {self.quantize!r}")
        if self.quantize_format not in FORMATS:
            raise ExportOptionsError(f"quantize_format must be one of {FORMATS}, got {self.quantize_format!r}")
        if self.quantize is not None and self.quantize_format == "qdq" and self.opset < 18:
            raise ExportOptionsError("the Q/DQ form needs opset 18 (an opset-17 graph cannot be raised to the INT4 "
                                     "DequantizeLinear of opset 21); export with --opset 18")
        if self.image_size is not None and self.max_image_size is not None:
            raise ExportOptionsError("give either image_size (fixed) or max_image_size (bounded), not both")
        for name, size in (("image_size", self.image_size), ("max_image_size", self.max_image_size)):
            if size is None:
                continue
            h, w = size
            if h < factor or w < factor:
                raise ExportOptionsError(f"{name} {h}x{w} is smaller than one merged patch ({factor}x{factor})")
            if name == "image_size" and (h % factor or w % factor):
                raise ExportOptionsError(f"image_size {h}x{w} must be a multiple of {factor} pixels on both sides")


def parse_hw(text: str) -> tuple[int, int]:
    """'448x448' -> (448, 448) as HEIGHT x WIDTH; ValueError otherwise."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected HEIGHTxWIDTH (e.g. 448x448), got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"expected positive sizes, got {text!r}")
    return h, w


# ----------------------------------------------------------------------------- helpers
def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    from vlsi_model.engine.torch_engine import TorchEngine

    return sorted(TorchEngine._stop_ids(model, tokenizer))


def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [model_dir / n for n in names]


def _io_spec(path: Path) -> dict[str, Any]:
    """Inputs/outputs of a saved graph: name -> {shape (int or axis name), dtype}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(values: Any) -> dict[str, Any]:
        out = {}
        for v in values:
            tt = v.type.tensor_type
            out[v.name] = {
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
            }
        return out

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def _torch_export(module: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int, exporter: str,
                  dynamo_shapes: Any = None) -> None:
    """Export `module` to `path` via a scratch directory, then write it in its final form.

    The exporters write weights of large models as external data in their own layout (one
    file per tensor for the TorchScript exporter); `_finalize_graph` rewrites every graph as a
    single file, or graph + one `<name>.data` file beyond EXTERNAL_DATA_THRESHOLD (protobuf
    cannot hold more than 2 GB), which is what onnxruntime and TensorRT's parser load.
    """
    import torch

    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        raw = scratch / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            else:
                program = torch.onnx.export(module, args, None, input_names=input_names,
                                            output_names=output_names, dynamic_shapes=dynamo_shapes,
                                            opset_version=opset, dynamo=True, verbose=False)
                program.save(str(raw))
        # the dynamo exporter names dynamic axes s0, s1 + s2, ...: give them the readable names
        _finalize_graph(raw, path, dynamic_axes if exporter == "dynamo" else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finalize_graph(raw: Path, path: Path, rename: dict[str, dict[int, str]] | None) -> None:
    import onnx

    model = onnx.load(str(raw))  # loads external data, whatever its layout
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, name in (rename or {}).get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                dim.dim_param = name
    size = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _to_dtype_keeping_rotary_fp32(model: Any, dtype: Any) -> Any:
    """`model.to(dtype)` with the rotary frequency buffers (`inv_freq`, `original_inv_freq`) kept
    in float32, as `from_pretrained(dtype=...)` keeps them.

    Why: `.to(float16)` rounds them too; at head_dim 128 and rope_theta 5e6 that moves the angle
    of position 4096 by 0.76 rad. The runtimes read them from rope.npz, and the parity check's
    PyTorch reference must compute positions the way the torch backend does."""
    import torch

    names = ("inv_freq", "original_inv_freq")
    saved = [(m, n, m._buffers[n].detach().float().clone()) for m in model.modules() for n in names
             if isinstance(m._buffers.get(n), torch.Tensor)]
    model = model.to(dtype)
    for module, name, value in saved:
        module._buffers[name] = value
    return model


# ----------------------------------------------------------------------------- export
def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export `model_dir` into `out_dir` (written atomically); returns the manifest.

    Raises ExportError for bad options, a failed check or parity beyond tolerance,
    UnsupportedModelError for an architecture without an export, and
    ModelLoadError for a bad model directory.
    """
    import torch

    from vlsi_model.checkpoint import load_model_dir, read_metadata
    from vlsi_model.engine.np_inputs import ImageConfig, VisionSpec, preprocess_image, vision_aux_inputs
    from vlsi_model.export.graphs import DecoderGraph, Qwen3VisionGraph, VisionGraph, mask_value

    say = progress or (lambda msg: log.info(msg))
    options = options or ExportOptions()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    unsupported = mf.export_unsupported(model_dir)
    if unsupported is not None:
        raise UnsupportedModelError(unsupported)
    if out_dir.exists() and not overwrite:
        raise ExportOptionsError(f"{out_dir} already exists (use overwrite / --overwrite to replace it)")
    t_start = time.perf_counter()
    model, tokenizer, processor = load_model_dir(model_dir)
    cfg = model.config
    text_cfg = cfg.get_text_config()
    vcfg = cfg.vision_config
    model_type = cfg.model_type
    merge, patch = int(vcfg.spatial_merge_size), int(vcfg.patch_size)
    factor = merge * patch
    options.validate(factor)
    torch_dtype = torch.float16 if options.dtype == "fp16" else torch.float32
    model = _to_dtype_keeping_rotary_fp32(model, torch_dtype).eval()

    # ---- image limits --------------------------------------------------------------
    base_image = ImageConfig.from_json(model_dir / "preprocessor_config.json")
    fixed = options.image_size
    min_pixels, max_pixels = base_image.min_pixels, base_image.max_pixels
    if options.max_image_size is not None:
        max_pixels = min(max_pixels, options.max_image_size[0] * options.max_image_size[1])
        min_pixels = min(min_pixels, max_pixels)
    if fixed is not None:
        min_pixels = max_pixels = fixed[0] * fixed[1]
    image_cfg = replace(base_image, min_pixels=min_pixels, max_pixels=max_pixels, fixed_size=fixed)
    per_patch = patch * patch
    min_patches = max(merge * merge, (min_pixels // (factor * factor)) * merge * merge)
    max_patches = (max_pixels // (factor * factor)) * merge * merge
    qwen3 = model_type == "qwen3_vl"
    spec = VisionSpec(model_type=model_type, merge_size=merge, patch_size=patch,
                      window_size=int(getattr(vcfg, "window_size", 0) or 0),
                      position_grid=round(int(vcfg.num_position_embeddings) ** 0.5) if qwen3 else 0)

    # Example image for tracing and the parity check: a synthetic scene, not square, so the
    # two grid axes differ (catches swapped height/width).
    from vlsi_model.data import render, scenes
    example = render.render_scene(scenes.generate_scene(7, scenes.SceneConfig(width=200, height=150)))
    pixel_values, grid = preprocess_image(example, image_cfg)

    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temporary sibling must be on the same filesystem
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # ---- vision --------------------------------------------------------------------
        say(f"exporting the vision tower ({model_type}, grid {grid[1]}x{grid[2]} patches in the example)")
        vision = (Qwen3VisionGraph(model.model.visual) if qwen3 else VisionGraph(model.model.visual, model_type)).eval()
        aux = vision_aux_inputs(grid, spec, model.model.visual.rotary_pos_emb.inv_freq.numpy())
        v_names = ["pixel_values", "rotary_cos", "rotary_sin", "full_segments"]  # one row per patch
        if qwen3:
            v_names = ["pixel_values", "pos_indices", "pos_weights", "rotary_cos", "rotary_sin", "full_segments"]
        per_patch_inputs = len(v_names)
        if model_type == "qwen2_5_vl":
            v_names += ["window_segments", "window_index", "reverse_index"]
        v_outputs = ["image_embeds", "deepstack_embeds"] if qwen3 else ["image_embeds"]
        v_args = tuple(torch.from_numpy(pixel_values if n == "pixel_values" else aux[n]) for n in v_names)
        v_dyn: dict[str, dict[int, str]] = {}
        v_shapes: Any = None
        if fixed is None:
            v_dyn = {n: {0: "patches"} for n in v_names[:per_patch_inputs]}
            v_dyn["image_embeds"] = {0: "image_tokens"}
            if qwen3:
                v_dyn["deepstack_embeds"] = {1: "image_tokens"}
            if model_type == "qwen2_5_vl":
                v_dyn["window_segments"] = {0: "patches"}
                v_dyn["window_index"] = {0: "image_tokens"}
                v_dyn["reverse_index"] = {0: "image_tokens"}
            if options.exporter == "dynamo":
                m_dim = torch.export.Dim("image_tokens", min=1, max=max(max_patches // (merge * merge), 2))
                p_dim = merge * merge * m_dim
                v_shapes = tuple({0: p_dim} for _ in v_names[:per_patch_inputs])
                if model_type == "qwen2_5_vl":
                    v_shapes += ({0: p_dim}, {0: m_dim}, {0: m_dim})
        _torch_export(vision, v_args, tmp / mf.VISION_FILE, v_names, v_outputs, v_dyn, options.opset,
                      options.exporter, v_shapes)

        # ---- decoder -------------------------------------------------------------------
        say("exporting the text decoder (prefill + decode, one graph)")
        decoder = DecoderGraph(model).eval()
        n_layers, kvh, hd = decoder.num_layers, decoder.num_kv_heads, decoder.head_dim
        hidden = text_cfg.hidden_size
        s_ex, p_ex = 5, 3
        g = torch.Generator().manual_seed(0)
        d_args = [torch.randn(1, s_ex, hidden, generator=g).to(torch_dtype),
                  torch.randn(1, s_ex, hd, generator=g).to(torch_dtype),
                  torch.randn(1, s_ex, hd, generator=g).to(torch_dtype),
                  torch.zeros(1, 1, s_ex, p_ex + s_ex, dtype=torch_dtype)]
        deepstack_layers = decoder.deepstack_layers
        ds_names = ["deepstack_embeds"] if deepstack_layers else []
        if deepstack_layers:
            d_args.append(torch.randn(deepstack_layers, 1, s_ex, hidden, generator=g).to(torch_dtype))
        d_args += [torch.randn(1, kvh, p_ex, hd, generator=g).to(torch_dtype) for _ in range(2 * n_layers)]
        kv_in = [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        kv_out = [f"present_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        d_names = ["inputs_embeds", "rotary_cos", "rotary_sin", "attention_bias", *ds_names, *kv_in]
        d_dyn: dict[str, dict[int, str]] = {
            "inputs_embeds": {1: "seq"}, "rotary_cos": {1: "seq"}, "rotary_sin": {1: "seq"},
            "attention_bias": {2: "seq", 3: "total"}, **{n: {2: "seq"} for n in ds_names},
            **{n: {2: "past"} for n in kv_in}, **{n: {2: "total"} for n in kv_out},
        }
        d_shapes = None
        if options.exporter == "dynamo":
            auto = torch.export.Dim.AUTO
            # DecoderGraph.forward's *extra (DeepStack features, then the past KV) is one tuple here
            d_shapes = ({1: auto}, {1: auto}, {1: auto}, {2: auto, 3: auto},
                        tuple({2: auto} for _ in [*ds_names, *kv_in]))
        _torch_export(decoder, tuple(d_args), tmp / mf.DECODER_FILE, d_names, ["logits", *kv_out], d_dyn,
                      options.opset, options.exporter, d_shapes)

        # ---- tables and copied files -------------------------------------------------------
        np_dtype = np.float16 if options.dtype == "fp16" else np.float32
        embed = model.get_input_embeddings().weight.detach().to(torch.float32).numpy().astype(np_dtype)
        np.save(tmp / mf.EMBED_FILE, embed)
        np.savez(tmp / mf.ROPE_FILE,
                 text_inv_freq=model.model.language_model.rotary_emb.inv_freq.numpy(),
                 vision_inv_freq=model.model.visual.rotary_pos_emb.inv_freq.numpy())
        copied = []
        for name in mf.COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
                copied.append(name)

        # ---- manifest ----------------------------------------------------------------------
        import onnx
        import transformers

        meta = read_metadata(model_dir)
        manifest: dict[str, Any] = {
            "format": mf.FORMAT,
            "format_version": mf.FORMAT_VERSION,
            "model_name": str(meta.get("name") or model_dir.name),
            "model_type": model_type,
            "source_dir": str(model_dir.resolve()),
            "source_weights_sha256": {p.name: mf.sha256_file(p) for p in _weight_files(model_dir)},
            "placeholder": bool(meta.get("placeholder", False)),
            "created_unix": int(time.time()),
            "opset": options.opset,
            "dtype": options.dtype,
            "exporter": options.exporter,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__},
            "files": {"vision": mf.VISION_FILE, "decoder": mf.DECODER_FILE, "embed_tokens": mf.EMBED_FILE,
                      "rope": mf.ROPE_FILE, "copied": copied},
            "text": {
                "hidden_size": hidden,
                "num_layers": n_layers,
                "num_heads": decoder.num_heads,
                "num_kv_heads": kvh,
                "head_dim": hd,
                "intermediate_size": int(text_cfg.intermediate_size),
                "vocab_size": int(text_cfg.vocab_size),
                "max_position_embeddings": int(text_cfg.max_position_embeddings),
                "mrope_section": [int(s) for s in text_cfg.rope_parameters["mrope_section"]],
                "mrope_interleaved": qwen3,  # Qwen3-VL's interleaved M-RoPE layout (np_inputs.mrope_cos_sin)
                "deepstack_layers": deepstack_layers,
                "image_token_id": int(cfg.image_token_id),
                "stop_token_ids": _stop_token_ids(model, tokenizer),
                "mask_value": mask_value(torch_dtype),
            },
            "vision": {
                "patch_size": patch,
                "merge_size": merge,
                "temporal_patch_size": int(vcfg.temporal_patch_size),
                "patch_dim": int(pixel_values.shape[1]),
                "window_size": spec.window_size,
                "position_grid": spec.position_grid,
                "deepstack_visual_indexes": [int(i) for i in getattr(vcfg, "deepstack_visual_indexes", None) or []],
                "num_heads": int(vcfg.num_heads),
                "depth": int(vcfg.depth),
                "inputs": v_names,
            },
            "image": {
                "mode": "fixed" if fixed else "bounded",
                "fixed_size": list(fixed) if fixed else None,
                "min_pixels": min_pixels,
                "max_pixels": max_pixels,
                "min_patches": min_patches,
                "max_patches": max_patches,
                "pixels_per_patch": per_patch,
                "note": f"bounded: images are resized (aspect kept) to multiples of {factor} px within [min_pixels, "
                        "max_pixels]; max_patches is exceeded only by extreme aspect ratios (> ~50:1)",
            },
            "graphs": {
                "vision": {**_io_spec(tmp / mf.VISION_FILE), "dynamic_axes": v_dyn},
                "decoder": {**_io_spec(tmp / mf.DECODER_FILE), "dynamic_axes": d_dyn,
                            "modes": {"prefill": "past = 0, seq = prompt length, attention_bias causal",
                                      "decode": "seq = 1, past = tokens so far, attention_bias zeros"}},
            },
        }
        (tmp / mf.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        # ---- checks ------------------------------------------------------------------------
        say("checking the graphs (onnx.checker, TensorRT 10 operator set)")
        manifest["checks"] = check_graphs(tmp)
        if options.check_parity:
            say("checking parity against PyTorch with ONNX Runtime")
            same_resize = fixed is None and (min_pixels, max_pixels) == (base_image.min_pixels, base_image.max_pixels)
            parity = parity_check(model, tokenizer, processor if same_resize else None, tmp, example,
                                  "How many objects are there?")
            manifest["parity"] = parity
            tol = TOLERANCE[options.dtype]
            worst = max(v for k, v in parity.items() if k.endswith("max_abs_diff"))
            if not (worst <= tol):  # also catches NaN
                raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.3g} (> {tol}): {parity}")
        if options.quantize is not None:
            from vlsi_model.export.quantize import BITS, quantize_export

            say(f"quantizing the decoder's weights to {options.quantize} ({options.quantize_format})")
            manifest["quantization"] = quantize_export(tmp, BITS[options.quantize], options.quantize_block_size,
                                                       accuracy_level=options.quantize_accuracy_level,
                                                       fmt=options.quantize_format)
            manifest["checks"] = check_graphs(tmp, tensorrt=options.quantize_format == "qdq")
            if options.check_parity:
                # Recorded, not enforced: what a quantized model costs is measured with `vlsi eval`.
                manifest["quantization"]["parity"] = parity_check(
                    model, tokenizer, processor if same_resize else None, tmp, example, "How many objects are there?")
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / mf.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        readable_as_umask_allows(tmp)

        replace_directory(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_graphs(export_dir: str | Path, tensorrt: bool = True) -> dict[str, Any]:
    """onnx.checker (full, with strict shape inference) + the TensorRT 10 op/type check of both graphs
    (`tensorrt=False`: skipped, for graphs meant for ONNX Runtime only, such as MatMulNBits ones).

    Raises ExportError on any failure; returns a summary per graph for the manifest.
    """
    import onnx

    from vlsi_model.export import trt_ops

    out: dict[str, Any] = {}
    for name in (mf.VISION_FILE, mf.DECODER_FILE):
        path = Path(export_dir) / name
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"{name} fails onnx.checker: {exc}") from exc
        report = trt_ops.check_model(path)
        if tensorrt and not report.ok:
            raise ExportError(f"{name} is not parseable by TensorRT 10:\n{report.summary()}")
        out[name] = {"onnx_checker": "ok", "tensorrt10_ops": "ok" if report.ok else "not checked (ONNX Runtime only)",
                     "op_types": sorted(report.op_counts), "nodes": sum(report.op_counts.values()),
                     "warnings": report.warnings}
    return out


def parity_check(model: Any, tokenizer: Any, processor: Any, export_dir: str | Path, image: np.ndarray,
                 question: str, num_threads: int | None = 1) -> dict[str, float]:
    """Max abs differences ONNX Runtime vs PyTorch: image embeddings, prefill logits, one decode step.

    The PyTorch side is the Hugging Face model itself (get_image_features, and full forwards
    with get_rope_index positions), the ONNX side the runtime engine's own stages, so this also
    checks the numpy preprocessing, prompt building and M-RoPE positions end to end. Give the
    model's image `processor` when the export keeps its resize (then the PyTorch side uses the
    processor's own pixels), None for a fixed or narrowed image size.
    """
    import torch

    from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
    from vlsi_model.prompting import build_inputs

    engine = OnnxRuntimeEngine(export_dir, num_threads=num_threads)
    try:
        prep = engine.prepare(image, question)
        if processor is not None:  # the export keeps the processor's resize: compare preprocessing too
            ref = build_inputs(tokenizer, processor, image, question)
        else:  # fixed or narrowed image size: the reference gets the same numpy patches
            ids = torch.from_numpy(prep["input_ids"])[None]
            ref = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "mm_token_type_ids": (ids == engine.image_token_id).long(),
                   "pixel_values": torch.from_numpy(prep["pixel_values"]),
                   "image_grid_thw": torch.tensor([prep["grid_thw"]], dtype=torch.long)}
        if not np.array_equal(ref["input_ids"][0].numpy(), prep["input_ids"]):
            raise ExportError("the numpy prompt builder's token ids differ from vlsi_model.prompting.build_inputs")
        if tuple(ref["pixel_values"].shape) != prep["pixel_values"].shape:
            raise ExportError(f"numpy preprocessing gives {prep['pixel_values'].shape} patches, the image "
                              f"processor {tuple(ref['pixel_values'].shape)}")
        out: dict[str, float] = {}
        out["pixel_values_max_abs_diff"] = float(np.abs(ref["pixel_values"].numpy() - prep["pixel_values"]).max())
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            vision_out = model.model.get_image_features(ref["pixel_values"].to(dtype), ref["image_grid_thw"],
                                                        return_dict=True)
            feats = vision_out.pooler_output
            t_img = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
            o_img, o_deepstack = engine.run_vision(prep["pixel_values"], prep["grid_thw"])
            out["vision_max_abs_diff"] = float(np.abs(o_img.astype(np.float32) - t_img.float().numpy()).max())
            if o_deepstack is not None:  # Qwen3-VL: every DeepStack block's features too
                t_deep = np.stack([torch.cat(list(f), 0).float().numpy() if isinstance(f, (list, tuple))
                                   else f.float().numpy() for f in vision_out.deepstack_features])
                out["deepstack_max_abs_diff"] = float(np.abs(o_deepstack.astype(np.float32) - t_deep).max())

            ids = prep["input_ids"]
            o_logits, past, rope_delta = engine.prefill(ids, engine.embed(ids, o_img), prep["grid_thw"], o_deepstack)
            t_out = model(**{k: v for k, v in ref.items() if k != "labels"}, use_cache=False)
            t_logits = t_out.logits[0, -1].float().numpy()
            out["prefill_logits_max_abs_diff"] = float(np.abs(o_logits - t_logits).max())

            nxt = int(np.argmax(t_logits))
            o_logits2, _ = engine.decode_step(nxt, len(ids) + rope_delta, past)
            ref2 = dict(ref)
            ref2["input_ids"] = torch.cat([ref["input_ids"], torch.tensor([[nxt]])], dim=1)
            ref2["attention_mask"] = torch.ones_like(ref2["input_ids"])
            ref2["mm_token_type_ids"] = torch.cat([ref["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
            t_logits2 = model(**{k: v for k, v in ref2.items() if k != "labels"}, use_cache=False).logits[0, -1]
            out["decode_logits_max_abs_diff"] = float(np.abs(o_logits2 - t_logits2.float().numpy()).max())
            out["same_argmax"] = float(int(np.argmax(o_logits)) == nxt and
                                       int(np.argmax(o_logits2)) == int(t_logits2.argmax()))
    finally:
        engine.close()
    return out
