"""`vlsi export`: graphs pass onnx.checker and TensorRT 10's operator set, match PyTorch through
ONNX Runtime (Qwen2-VL, Qwen2.5-VL with real windowing, fixed size, fp16), manifest contents,
option errors and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_helpers import build_windowed_qwen25vl, export_once

from vlsi_model import manifest as mf
from vlsi_model.cli import main as cli_main
from vlsi_model.export import trt_ops
from vlsi_model.export.onnx_export import ExportOptions, ExportOptionsError, export_model, parse_hw

FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def windowed_qwen25vl_dir(tmp_path_factory, tiny_tokenizer, torch_threads):
    return build_windowed_qwen25vl(tmp_path_factory.mktemp("q25w"), tiny_tokenizer)


@pytest.fixture(scope="module")
def qwen2vl_export(tiny_qwen2vl_dir):
    return export_once(tiny_qwen2vl_dir)


@pytest.fixture(scope="module")
def qwen25vl_export(windowed_qwen25vl_dir):
    return export_once(windowed_qwen25vl_dir)


def _manifest(export_dir):
    return json.loads((export_dir / mf.MANIFEST_FILE).read_text())


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("which", ["qwen2vl_export", "qwen25vl_export"])
def test_export_matches_pytorch(request, which):
    export_dir = request.getfixturevalue(which)
    m = _manifest(export_dir)
    parity = m["parity"]
    assert parity["pixel_values_max_abs_diff"] == 0.0  # numpy preprocessing == the image processor
    for key in ("vision_max_abs_diff", "prefill_logits_max_abs_diff", "decode_logits_max_abs_diff"):
        assert parity[key] < FP32_TOL, (key, parity[key])
    assert parity["same_argmax"] == 1.0


def test_qwen25vl_example_really_uses_several_windows(windowed_qwen25vl_dir, qwen25vl_export):
    """The parity above is only meaningful for windowed attention if the example spans windows."""
    from vlsi_model.data import render, scenes
    from vlsi_model.engine.np_inputs import ImageConfig, VisionSpec, preprocess_image, vision_aux_inputs

    m = _manifest(qwen25vl_export)
    assert m["model_type"] == "qwen2_5_vl" and m["vision"]["window_size"] == 56
    image = render.render_scene(scenes.generate_scene(7, scenes.SceneConfig(width=200, height=150)))
    _, grid = preprocess_image(image, ImageConfig.from_json(windowed_qwen25vl_dir / "preprocessor_config.json"))
    aux = vision_aux_inputs(grid, VisionSpec("qwen2_5_vl", 2, 14, 56), np.ones(4, np.float32))
    assert len(set(aux["window_segments"].tolist())) >= 4
    assert not np.array_equal(aux["window_index"], np.arange(len(aux["window_index"])))


def test_manifest_contents(tiny_qwen2vl_dir, qwen2vl_export):
    m = _manifest(qwen2vl_export)
    assert m["format"] == mf.FORMAT and m["format_version"] == mf.FORMAT_VERSION
    assert m["model_type"] == "qwen2_vl" and m["opset"] == 17 and m["dtype"] == "fp32"
    assert m["source_weights_sha256"] == {"model.safetensors": mf.sha256_file(tiny_qwen2vl_dir / "model.safetensors")}
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"):
        assert name in m["files"]["copied"] and (qwen2vl_export / name).is_file()
    dec = m["graphs"]["decoder"]
    assert dec["inputs"]["inputs_embeds"]["shape"] == [1, "seq", m["text"]["hidden_size"]]
    assert dec["inputs"]["attention_bias"]["shape"] == [1, 1, "seq", "total"]
    assert dec["inputs"]["past_key_0"]["shape"][2] == "past"
    assert dec["outputs"]["present_value_1"]["shape"][2] == "total"
    assert dec["outputs"]["logits"]["shape"] == [1, m["text"]["vocab_size"]]
    vis = m["graphs"]["vision"]
    assert vis["inputs"]["pixel_values"]["shape"] == ["patches", m["vision"]["patch_dim"]]
    assert vis["outputs"]["image_embeds"]["shape"][0] == "image_tokens"
    # no int64 and no float64 anywhere in the graph interfaces (TensorRT-friendly)
    for g in (vis, dec):
        for spec in [*g["inputs"].values(), *g["outputs"].values()]:
            assert spec["dtype"] in ("float32", "int32"), spec
    assert m["image"]["mode"] == "bounded" and m["image"]["max_pixels"] == 112 * 112
    assert m["text"]["stop_token_ids"]
    embed = np.load(qwen2vl_export / mf.EMBED_FILE)
    assert embed.shape == (m["text"]["vocab_size"], m["text"]["hidden_size"])
    assert mf.load_manifest(qwen2vl_export)["model_type"] == "qwen2_vl"


def test_checker_and_tensorrt_ops_on_every_graph(qwen2vl_export, qwen25vl_export):
    for export_dir in (qwen2vl_export, qwen25vl_export):
        for name in (mf.VISION_FILE, mf.DECODER_FILE):
            path = export_dir / name
            onnx.checker.check_model(str(path), full_check=True)
            report = trt_ops.check_model(path)
            assert report.ok, report.summary()
            assert not report.warnings, report.summary()  # no int64 graph inputs/outputs
            assert report.op_counts["MatMul"] > 0
            assert set(report.op_counts) <= trt_ops.TENSORRT10_SUPPORTED_OPS


# ------------------------------------------------------------------------------------- trt_ops
def _tiny_graph(nodes, inputs=None, outputs=None, functions=(), opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("local", 1)] if functions else [])
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_trt_ops_flags_unsupported_ops_in_functions_and_subgraphs():
    # an unsupported op (Unique) hidden inside a local function ...
    fn = helper.make_function("local", "MyFn", ["a"], ["b"], [helper.make_node("Unique", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    model = _tiny_graph([helper.make_node("MyFn", ["x"], ["y"], domain="local")], functions=[fn])
    report = trt_ops.check_model(model)
    assert not report.ok and report.unsupported_ops == {"Unique": 1}
    # ... and one inside an If branch
    then_g = helper.make_graph([helper.make_node("StringNormalizer", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _tiny_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), cond])
    report = trt_ops.check_model(model)
    assert report.unsupported_ops == {"StringNormalizer": 1}
    assert report.op_counts["Identity"] == 1  # the walk reached the else branch too
    # custom-domain ops (e.g. ONNX Runtime contrib ops) are not TensorRT ops
    model = _tiny_graph([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")])
    assert trt_ops.check_model(model).unsupported_ops == {"com.microsoft.FusedMatMul": 1}


def test_trt_ops_flags_double_and_warns_int64():
    model = _tiny_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)],
                        outputs=[helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])
    report = trt_ops.check_model(model)
    assert not report.ok and any("DOUBLE" in e for e in report.errors)
    model = _tiny_graph([helper.make_node("Identity", ["x"], ["y"])],
                        inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                        outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    report = trt_ops.check_model(model)
    assert report.ok and len(report.warnings) == 2 and "INT64" in report.warnings[0]



def test_trt_ops_requires_constant_axes():
    """onnx-tensorrt: Slice/Squeeze/Unsqueeze/Reduce* `axes` must be initializers (or Constant outputs)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    ax = helper.make_tensor_value_info("ax", TensorProto.INT64, [1])
    computed = _tiny_graph([helper.make_node("ReduceMean", ["x", "ax"], ["y"])], inputs=[x, ax], opset=18)
    report = trt_ops.check_model(computed)
    assert not report.ok and "ReduceMean" in report.errors[0] and "constant" in report.errors[0]
    const = _tiny_graph([helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("v", TensorProto.INT64,
                                                                                              [1], [1])),
                         helper.make_node("ReduceMean", ["x", "ax"], ["y"])], inputs=[x], opset=18)
    assert trt_ops.check_model(const).ok

def test_trt_ops_checks_quantize_nodes_as_tensorrts_parser_does():
    """onnx-tensorrt 10.x: symmetric only, INT8/INT4/FP8 only, blocked scales for INT4 along one
    axis only, INT4 with an even last dimension; opset 21 (INT4 DequantizeLinear) only warns."""
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2])

    def dq(dtype, dims, scale_dims, zero=None, opset=21):
        count = int(np.prod(dims))
        inits = [helper.make_tensor("q", dtype, dims, [1] * count),
                 helper.make_tensor("s", TensorProto.FLOAT, scale_dims, [0.5] * int(np.prod(scale_dims)))]
        inputs = ["q", "s"]
        if zero is not None:
            inits.append(helper.make_tensor("z", dtype, scale_dims, [zero] * int(np.prod(scale_dims))))
            inputs.append("z")
        model = _tiny_graph([helper.make_node("DequantizeLinear", inputs, ["w"], axis=0)], inputs=[],
                            outputs=[w], opset=opset)
        model.graph.initializer.extend(inits)
        return trt_ops.check_model(model)

    good = dq(TensorProto.INT4, [4, 2], [1, 2])  # blocks of 4 along axis 0, what quantize.py writes
    assert good.ok and any("opset 21" in x for x in good.warnings)
    assert dq(TensorProto.INT4, [4, 2], [1, 2], zero=0).ok  # an all-zero zero point is symmetric
    assert dq(TensorProto.INT8, [4, 2], [2], opset=18).ok and not dq(TensorProto.INT8, [4, 2], [2], opset=18).warnings
    for report, words in ((dq(TensorProto.INT4, [4, 2], [1, 2], zero=3), "non-zero zero point"),
                          (dq(TensorProto.UINT4, [4, 2], [1, 2]), "UINT4"),
                          (dq(TensorProto.INT8, [4, 2], [1, 2]), "non-INT4"),
                          (dq(TensorProto.INT4, [4, 2], [2, 1]), "one"),
                          (dq(TensorProto.INT4, [2, 3], [1, 3]), "odd last dimension")):
        assert not report.ok and any(words in e for e in report.errors), (words, report.errors)


# ------------------------------------------------------------------------------------- options
def test_fixed_image_size_export_is_static(tiny_qwen2vl_dir):
    export_dir = export_once(tiny_qwen2vl_dir, image_size=(56, 84))
    m = _manifest(export_dir)
    assert m["image"]["mode"] == "fixed" and m["image"]["fixed_size"] == [56, 84]
    vis = onnx.load(str(export_dir / mf.VISION_FILE))
    for value in list(vis.graph.input) + list(vis.graph.output):
        assert all(not d.dim_param for d in value.type.tensor_type.shape.dim), value.name
    assert m["graphs"]["vision"]["inputs"]["pixel_values"]["shape"][0] == (56 // 14) * (84 // 14)
    assert m["parity"]["prefill_logits_max_abs_diff"] < FP32_TOL


def test_fp16_export(tiny_qwen2vl_dir):
    export_dir = export_once(tiny_qwen2vl_dir, dtype="fp16", opset=18)
    m = _manifest(export_dir)
    assert m["dtype"] == "fp16" and m["opset"] == 18
    assert m["graphs"]["decoder"]["inputs"]["inputs_embeds"]["dtype"] == "float16"
    assert m["graphs"]["decoder"]["outputs"]["logits"]["dtype"] == "float32"  # argmax in fp32, like generate
    assert np.load(export_dir / mf.EMBED_FILE).dtype == np.float16
    assert m["parity"]["decode_logits_max_abs_diff"] < 5e-2
    assert trt_ops.check_model(export_dir / mf.DECODER_FILE).ok
    # The rotary frequencies stay float32, as from_pretrained(dtype=float16) keeps them: rounded to
    # fp16 they would move far positions by a large fraction of a radian.
    from vlsi_model.checkpoint import load_model_dir

    model, _, _ = load_model_dir(tiny_qwen2vl_dir)
    with np.load(export_dir / mf.ROPE_FILE) as rope:
        for key, module in (("text_inv_freq", model.model.language_model.rotary_emb),
                            ("vision_inv_freq", model.model.visual.rotary_pos_emb)):
            assert rope[key].dtype == np.float32 and np.array_equal(rope[key], module.inv_freq.numpy()), key


def test_large_models_are_written_with_external_data(tiny_qwen2vl_dir, tmp_path, monkeypatch):
    """Beyond the threshold (2 GB protobuf limit) graphs are graph + one .data file; the checks,
    ONNX Runtime and the parity run all read that layout."""
    from vlsi_model.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1)
    out = tmp_path / "big"
    m = export_model(tiny_qwen2vl_dir, out, ExportOptions())
    for name in (mf.VISION_FILE, mf.DECODER_FILE):
        assert (out / (name + ".data")).is_file()
        assert (out / name).stat().st_size < (out / (name + ".data")).stat().st_size
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no scratch left behind
    assert m["parity"]["decode_logits_max_abs_diff"] < FP32_TOL

def test_bad_options(tiny_qwen2vl_dir, qwen2vl_export, tmp_path):
    with pytest.raises(ExportOptionsError, match="multiple of 28"):
        export_model(tiny_qwen2vl_dir, tmp_path / "a", ExportOptions(image_size=(100, 100)))
    with pytest.raises(ExportOptionsError, match="opset"):
        export_model(tiny_qwen2vl_dir, tmp_path / "b", ExportOptions(opset=13))
    with pytest.raises(ExportOptionsError, match="already exists"):
        export_model(tiny_qwen2vl_dir, qwen2vl_export, ExportOptions())
    assert parse_hw("448x336") == (448, 336)
    with pytest.raises(ValueError):
        parse_hw("448")


def test_cli_export(tiny_qwen2vl_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert cli_main(["export", "--model", str(tiny_qwen2vl_dir), "--out", str(out), "--max-image-size", "84x84",
                     "--no-parity"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["parity"] is None
    m = _manifest(out)
    assert m["image"]["max_pixels"] == 84 * 84 and "parity" not in m
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not left private by mkdtemp
    # exists -> 2; bad size -> argparse error (2); missing model -> 2
    assert cli_main(["export", "--model", str(tiny_qwen2vl_dir), "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--model", str(tiny_qwen2vl_dir), "--image-size", "abc"])
    assert exc.value.code == 2
    assert cli_main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLSI_SLOW_TESTS"), reason="dynamo export takes ~30 s; set VLSI_SLOW_TESTS=1")
def test_dynamo_exporter(windowed_qwen25vl_dir):
    export_dir = export_once(windowed_qwen25vl_dir, exporter="dynamo", opset=18)
    m = _manifest(export_dir)
    assert m["exporter"] == "dynamo"
    assert m["graphs"]["decoder"]["inputs"]["past_key_0"]["shape"][2] == "past"
    assert max(v for k, v in m["parity"].items() if k.endswith("diff")) < FP32_TOL



def _identical_answers(plain, quantized, scenes: int) -> tuple[int, int]:
    """(answers the two engines give identically, questions) over the questions of `scenes` scenes."""
    from vlsi_model.data.question_families import make_questions
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import SceneConfig, generate_scene

    same = total = 0
    for seed in range(scenes):
        scene = generate_scene(seed, SceneConfig(width=112, height=112, layout="grid"))
        image = render_scene(scene)
        for qa in make_questions(scene, seed):
            total += 1
            same += plain.answer(image, qa.question, 16).text == quantized.answer(image, qa.question, 16).text
    return same, total


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_export_is_smaller_and_answers_like_the_float_one(tmp_path, bits):
    """Weight-only int8 / int4 (MatMulNBits) on the shipped student: the decoder's file shrinks
    about 3x / 6x, ONNX Runtime loads it, and the answers are the float export's (int8) or nearly
    (int4; the accuracy cost on the test split is measured with vlsi eval, README)."""
    from vlsi_model.defaults import default_model_path
    from vlsi_model.engine import load_engine
    from vlsi_model.export.tensorrt_build import BuildError, build_engines
    model = default_model_path()
    float_dir = export_once(model)
    assert cli_main(["export", "--model", str(model), "--out", str(tmp_path / bits), "--quantize", bits]) == 0
    m = _manifest(tmp_path / bits)
    q = m["quantization"]
    assert q["bits"] == {"int8": 8, "int4": 4}[bits] and q["format"] == "MatMulNBits"
    # int8 activations inside the kernel by default: ONNX Runtime's fast CPU path (int8 weights
    # without it take a fallback kernel ~75x slower at 2B size, docs/benchmarks.md)
    import onnx

    graph = onnx.load(str(tmp_path / bits / "decoder.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert q["accuracy_level"] == 4 and levels == {4}
    decoder = q["graphs"]["decoder.onnx"]
    assert decoder["quantized"] == decoder["matmuls"] - 8  # every weight matmul; attention's 2 per layer stay
    assert decoder["bytes_after"] < decoder["bytes_before"] / (2.5 if bits == "int8" else 4.5)
    assert m["checks"]["decoder.onnx"]["tensorrt10_ops"] != "ok"
    with pytest.raises(BuildError, match="quantized for ONNX Runtime"):
        build_engines(tmp_path / bits, tmp_path / "engines")
    plain = load_engine(float_dir, backend="onnxruntime")
    quantized = load_engine(tmp_path / bits, backend="onnxruntime")
    same, total = _identical_answers(plain, quantized, scenes=6)
    assert same / total >= (1.0 if bits == "int8" else 0.8), (same, total)


@pytest.mark.parametrize(("bits", "dtype"), [("int4", None), ("int8", None), ("int4", "fp32")])
def test_qdq_export_is_what_tensorrt_builds_and_answers_like_the_float_one(tmp_path, bits, dtype, fake_trt):
    """`--quantize-format qdq` (fp16 graphs unless --dtype says otherwise): symmetric INT4 blocks /
    INT8 per channel in DequantizeLinear -> MatMul at opset 21, scales in the graph's dtype,
    passing onnx.checker and the TensorRT 10 checks; ONNX Runtime answers like the fp32 export;
    the builder (fake TensorRT 10 API) builds the decoder strongly typed, the vision graph as its
    dtype says, and records the weights."""
    import onnx

    from vlsi_model.defaults import default_model_path
    from vlsi_model.engine import load_engine
    from vlsi_model.export import tensorrt_build

    model = default_model_path()
    out = tmp_path / bits
    assert cli_main(["export", "--model", str(model), "--out", str(out), "--quantize", bits,
                     "--quantize-format", "qdq", *(["--dtype", dtype] if dtype else [])]) == 0
    m = _manifest(out)
    q = m["quantization"]
    assert q["format"] == "QDQ" and m["opset"] == 18 and m["checks"]["decoder.onnx"]["tensorrt10_ops"] == "ok"
    assert m["dtype"] == (dtype or "fp16")
    float_type = TensorProto.FLOAT16 if m["dtype"] == "fp16" else TensorProto.FLOAT
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    inits = {t.name: t for t in decoder.graph.initializer}
    dqs = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"]
    # every weight MatMul but the lm_head's (float, as ModelOpt leaves it); attention's 2 per layer stay
    assert len(dqs) == q["graphs"]["decoder.onnx"]["quantized"] == q["graphs"]["decoder.onnx"]["matmuls"] - 9
    lm_head = next(n for n in decoder.graph.node if n.name == "/lm_head/MatMul")
    assert inits[lm_head.input[1]].data_type == float_type
    assert all(len(n.input) == 2 for n in dqs)  # no zero point: symmetric
    weight, scale = inits[dqs[0].input[0]], inits[dqs[0].input[1]]
    assert decoder.opset_import[0].version == 21 and scale.data_type == float_type
    if bits == "int4":
        assert weight.data_type == TensorProto.INT4
        assert list(scale.dims) == [weight.dims[0] // 128, weight.dims[1]] and q["block_size"] == 128
    else:
        assert weight.data_type == TensorProto.INT8 and list(scale.dims) == [weight.dims[1]]
    ratio = q["graphs"]["decoder.onnx"]["bytes_before"] / q["graphs"]["decoder.onnx"]["bytes_after"]
    # the nano student's lm_head (float) is a third of its decoder; an fp16 graph starts half as big
    assert ratio > (2.5 if bits == "int8" else 3.0) / (2 if m["dtype"] == "fp16" else 1), ratio
    plain = load_engine(export_once(model), backend="onnxruntime")
    quantized = load_engine(out, backend="onnxruntime")
    same, total = _identical_answers(plain, quantized, scenes=4)
    assert same / total >= 0.8, (same, total)
    manifest = tensorrt_build.build_engines(out, tmp_path / "engines", progress=lambda msg: None)
    plans = {g: json.loads((tmp_path / "engines" / f"{g}.plan").read_bytes()) for g in ("vision", "decoder")}
    fp16 = m["dtype"] == "fp16"
    assert plans["decoder"]["strongly_typed"] and plans["decoder"]["flags"] == []
    assert plans["vision"]["strongly_typed"] == fp16 and ("FP16" in plans["vision"]["flags"]) != fp16
    assert manifest["strongly_typed"] == {"vision": fp16, "decoder": True} and manifest["weights"] == q["scheme"]
    assert "--stronglyTyped" in manifest["trtexec"][1] and ("--stronglyTyped" in manifest["trtexec"][0]) == fp16


def test_qdq_needs_opset_18_and_a_quantization(tmp_path, capsys):
    from vlsi_model.export.onnx_export import ExportOptions, ExportOptionsError

    with pytest.raises(ExportOptionsError, match="opset 18"):
        ExportOptions(opset=17, quantize="int4", quantize_format="qdq").validate(28)
    assert cli_main(["export", "--out", str(tmp_path / "x"), "--quantize-format", "qdq"]) == 2
    assert "--quantize-format needs --quantize" in capsys.readouterr().err


def test_an_architecture_without_an_export_is_refused_by_name(tmp_path, capsys):
    """Before loading any weights: `vlsi export` exits 2 and the exported backends refuse it, so
    auto would serve it with torch."""
    from vlsi_model.engine import load_engine
    from vlsi_model.engine.base import ModelLoadError

    model = tmp_path / "gemma"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    assert cli_main(["export", "--model", str(model), "--out", str(tmp_path / "onnx")]) == 2
    assert "ONNX export of gemma3 is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(ModelLoadError, match="ONNX export of gemma3 is not supported yet"):
        load_engine(model, backend="onnxruntime")
