"""TensorRT: the pure parts everywhere (engine-manifest checks, optimisation profiles, trtexec
command text, Q/DQ detection, the absent-TensorRT exit status, Jetson memory arithmetic); a real
build + run + parity with ONNX Runtime only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_helpers import export_once

from vlsi_model import manifest as mf
from vlsi_model.cli import main as cli_main
from vlsi_model.engine.tensorrt_engine import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    EngineMismatchError,
    check_engine_files,
    check_engine_manifest,
    find_engine_dir,
    plan_bytes,
    tensorrt_available,
)
from vlsi_model.export import memory
from vlsi_model.export.tensorrt_build import (
    EXIT_BAD_INPUT,
    EXIT_NO_TENSORRT,
    EXIT_OK,
    EXTEND_MAX_TOKENS,
    BuildError,
    ShapeRanges,
    compute_profiles,
    default_ranges,
    has_qdq,
    trtexec_commands,
)

ORIN = {"name": "Orin", "compute_capability": "8.7"}


def engine_manifest(**over):
    m = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "tensorrt_version": "10.3.0",
         "gpu": dict(ORIN), "precision": "fp16", "source_export": {"dir": "/data/student/onnx"}}
    m.update(over)
    return m


@pytest.fixture(scope="module")
def export_dir(tiny_qwen2vl_dir):
    return export_once(tiny_qwen2vl_dir)


@pytest.fixture(scope="module")
def export_manifest(export_dir):
    return json.loads((export_dir / mf.MANIFEST_FILE).read_text())


# ------------------------------------------------------------------------------ manifest check (pure)
def test_manifest_check_accepts_the_same_system():
    check_engine_manifest(engine_manifest(), "10.3.0", ORIN)
    # same compute capability, other board name (Orin Nano vs AGX Orin): TensorRT accepts it
    check_engine_manifest(engine_manifest(), "10.3.0", {"name": "Orin Nano", "compute_capability": "8.7"})


@pytest.mark.parametrize("version,gpu,words", [
    ("10.7.0", ORIN, ["TensorRT 10.3.0", "TensorRT 10.7.0"]),
    ("10.3.0", {"name": "NVIDIA RTX 4090", "compute_capability": "8.9"}, ["8.7", "8.9", "RTX 4090"]),
])
def test_manifest_check_refuses_other_version_or_gpu(version, gpu, words):
    with pytest.raises(EngineMismatchError) as exc:
        check_engine_manifest(engine_manifest(), version, gpu, "trt_engines/student")
    msg = str(exc.value)
    for w in words:
        assert w in msg
    assert "vlsi build-engine --onnx /data/student/onnx --out trt_engines/student --fp16" in msg


def test_manifest_check_refuses_foreign_or_old_manifests():
    with pytest.raises(EngineMismatchError, match="not a vlsi TensorRT"):
        check_engine_manifest({"format": "something"}, "10.3.0", ORIN)
    with pytest.raises(EngineMismatchError, match="version 0"):
        check_engine_manifest(engine_manifest(format_version=0), "10.3.0", ORIN)
    with pytest.raises(EngineMismatchError, match="--int8"):
        check_engine_manifest(engine_manifest(precision="int8"), "10.8.0", ORIN)


def test_engine_files_are_checked_against_the_manifest(tmp_path):
    """An engine directory loads only with the files it was built with: plans of the recorded size
    and hash, the export manifest and copied files with the recorded sha256 (an edited manifest,
    a swapped plan or export file is refused with a rebuild hint)."""
    (tmp_path / mf.MANIFEST_FILE).write_text('{"model_name": "m"}\n')
    (tmp_path / "tokenizer.json").write_text("{}")
    plans = {}
    for graph in ("vision", "decoder"):
        (tmp_path / f"{graph}.plan").write_bytes(graph.encode() * 100)
        plans[graph] = {"file": f"{graph}.plan", "size_bytes": 100 * len(graph),
                        "sha256": mf.sha256_file(tmp_path / f"{graph}.plan")}
    manifest = engine_manifest(engines=plans, copied_sha256={
        mf.MANIFEST_FILE: mf.sha256_file(tmp_path / mf.MANIFEST_FILE),
        "tokenizer.json": mf.sha256_file(tmp_path / "tokenizer.json")})
    manifest["source_export"]["export_manifest_sha256"] = mf.sha256_file(tmp_path / mf.MANIFEST_FILE)
    check_engine_files(manifest, tmp_path)
    plan = plan_bytes(tmp_path, plans["vision"], manifest)  # a read-only map of the file, not a heap copy
    assert plan[:] == b"vision" * 100
    with pytest.raises(TypeError):
        plan[0] = 0
    plan.close()

    (tmp_path / mf.MANIFEST_FILE).write_text('{"model_name": "edited"}\n')
    with pytest.raises(EngineMismatchError, match="sha256 mismatch.*vlsi build-engine"):
        check_engine_files(manifest, tmp_path)
    (tmp_path / mf.MANIFEST_FILE).write_text('{"model_name": "m"}\n')
    (tmp_path / "decoder.plan").write_bytes(b"short")
    with pytest.raises(EngineMismatchError, match="changed after it was built"):
        check_engine_files(manifest, tmp_path)
    (tmp_path / "vision.plan").write_bytes(b"VISION" * 100)  # same size, other bytes
    with pytest.raises(EngineMismatchError, match="sha256 differs"):
        plan_bytes(tmp_path, plans["vision"], manifest)
    (tmp_path / "decoder.plan").unlink()
    with pytest.raises(EngineMismatchError, match="missing"):
        check_engine_files(manifest, tmp_path)


def test_find_engine_dir(tmp_path):
    assert find_engine_dir(tmp_path) is None
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "manifest.json").write_text(json.dumps(engine_manifest()))
    assert find_engine_dir(tmp_path) == tmp_path / "tensorrt"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "not ours"}')
    assert find_engine_dir(tmp_path, engine_dir=tmp_path / "other") is None


# ------------------------------------------------------------------------------ profiles (pure)
def test_default_profiles_cover_the_export(export_manifest):
    ranges = default_ranges(export_manifest)
    image = export_manifest["image"]
    assert ranges.image_tokens == (image["min_patches"] // 4, image["max_patches"] // 4, image["max_patches"] // 4)
    profiles = compute_profiles(export_manifest, ranges)
    (vision,) = profiles["vision"]
    pv = vision["pixel_values"]
    assert pv["max"] == [image["max_patches"], export_manifest["vision"]["patch_dim"]]
    assert vision["rotary_cos"]["opt"][0] == pv["opt"][0] == vision["full_segments"]["opt"][0]
    prefill, decode, extend = profiles["decoder"]
    n_layers = export_manifest["text"]["num_layers"]
    assert len(prefill) == len(decode) == len(extend) == 4 + 2 * n_layers
    for key in ("min", "opt", "max"):
        seq = prefill["inputs_embeds"][key][1]
        assert prefill["past_key_0"][key][2] == 1  # the masked pad slot: never an empty tensor
        assert prefill["attention_bias"][key][2:] == [seq, seq + 1]
        assert decode["inputs_embeds"][key][1] == 1
        past = decode["past_value_1"][key][2]
        assert decode["attention_bias"][key][2:] == [1, past + 1]
        # extend: a question's own tokens after a cached prefix (pad slot included), consistent dims
        seq, past = extend["inputs_embeds"][key][1], extend["past_key_1"][key][2]
        assert extend["attention_bias"][key][2:] == [seq, past + seq] and past >= 2
    assert decode["past_key_0"]["max"][2] == ranges.max_context
    longest = ranges.prefill_tokens[2]  # a question's own tokens (<= EXTEND_MAX_TOKENS) after any prefix
    assert extend["inputs_embeds"]["min"][1] == 1
    assert extend["inputs_embeds"]["max"][1] == min(longest, EXTEND_MAX_TOKENS) == 128
    assert extend["past_key_0"]["max"][2] == longest + 1
    for prof in [vision, prefill, decode, extend]:
        for shapes in prof.values():
            assert all(a <= b <= c for a, b, c in zip(shapes["min"], shapes["opt"], shapes["max"], strict=True))


def test_profiles_for_fixed_size_and_bad_ranges(tiny_qwen2vl_dir, export_manifest):
    fixed = json.loads((export_once(tiny_qwen2vl_dir, image_size=(56, 84)) / mf.MANIFEST_FILE).read_text())
    profiles = compute_profiles(fixed, default_ranges(fixed))
    assert profiles["vision"] == []  # static graph: no profile
    assert len(profiles["decoder"]) == 3
    with pytest.raises(BuildError, match="min <= opt <= max"):
        compute_profiles(export_manifest, ShapeRanges((4, 2, 8), (10, 20, 30), 100))
    with pytest.raises(BuildError, match="max_context"):
        compute_profiles(export_manifest, ShapeRanges((4, 4, 8), (10, 20, 30), 30))


def test_trtexec_commands(export_dir, export_manifest):
    profiles = compute_profiles(export_manifest, default_ranges(export_manifest))
    vision, decoder = trtexec_commands(export_dir, "trt_engines/tiny", profiles, workspace_mb=1024, dla_core=0,
                                       timing_cache="cache.bin")
    for cmd, graph in ((vision, "vision"), (decoder, "decoder")):
        assert cmd.startswith("trtexec ") and f"--onnx={export_dir}/{graph}.onnx" in cmd
        assert f"--saveEngine=trt_engines/tiny/{graph}.plan" in cmd
        assert "--fp16" in cmd and "--memPoolSize=workspace:1024M" in cmd
        assert "--useDLACore=0 --allowGPUFallback" in cmd and "--timingCacheFile=cache.bin" in cmd
    assert vision.count("--minShapes=") == 1 and "pixel_values:" in vision
    assert decoder.count("--minShapes=") == decoder.count("--maxShapes=") == 3  # prefill, decode, extend
    assert decoder.index("--profile=0 --minShapes=") < decoder.index("--profile=1 --minShapes=") < \
        decoder.index("--profile=2 --minShapes=")  # trtexec syntax
    assert "--profile=" not in vision  # a single profile needs no index
    h = export_manifest["text"]["hidden_size"]
    assert f"--minShapes=inputs_embeds:1x1x{h}," in decoder  # decode profile: one token
    strongly = trtexec_commands(export_dir, "out", profiles, strongly_typed=True)[1]
    assert "--stronglyTyped" in strongly and "--fp16" not in strongly


def test_has_qdq(export_dir, tmp_path):
    assert not has_qdq(export_dir / mf.DECODER_FILE)
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[scale, zp])
    path = tmp_path / "qdq.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert has_qdq(path)


# ------------------------------------------------------------------------------ CLI without TensorRT
@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: the build would run")
def test_build_engine_without_tensorrt_exits_3(export_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--out", str(out), "--workspace-mb", "512"]) \
        == EXIT_NO_TENSORRT == 3
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("trtexec ")]
    assert len(lines) == 2 and "--memPoolSize=workspace:512M" in lines[0]
    assert "TensorRT is not installed" in captured.err and "exit status 3" in captured.err
    assert not out.exists()  # nothing half-built


def test_build_engine_bad_input(export_dir, tmp_path, capsys):
    assert cli_main(["build-engine", "--onnx", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "vlsi export" in capsys.readouterr().err
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--prefill-tokens", "10,20,30",
                     "--max-context", "20"]) == EXIT_BAD_INPUT
    with pytest.raises(SystemExit):
        cli_main(["build-engine", "--onnx", str(export_dir), "--image-tokens", "5,2,9"])
    with pytest.raises(SystemExit):
        cli_main(["build-engine", "--onnx", str(export_dir), "--fp16", "--int8"])


def test_int8_needs_qdq_export(export_dir, tmp_path, capsys):
    from vlsi_model.export.tensorrt_build import build_engines

    with pytest.raises(BuildError, match="Q/DQ"):
        build_engines(export_dir, tmp_path / "e", precision="int8")


# ------------------------------------------------------------------------------ memory arithmetic
@pytest.fixture(scope="module")
def qwen3vl_export(tiny_qwen3vl_dir):
    return export_once(tiny_qwen3vl_dir)


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_qwen25vl_dir", "tiny_qwen3vl_dir"])
def test_param_counts_equal_real_models(request, fixture):
    from vlsi_model.checkpoint import load_model_dir

    path = request.getfixturevalue(fixture)
    model, _, _ = load_model_dir(path)
    counts = memory.param_counts(memory.ModelDims.from_config(json.loads((path / "config.json").read_text())))
    lm = model.model.language_model
    assert counts["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    assert counts["embed"] == lm.embed_tokens.weight.numel()
    assert counts["decoder_layers"] == sum(p.numel() for p in lm.parameters()) - counts["embed"]
    assert counts["lm_head"] == model.lm_head.weight.numel()


def test_qwen2vl_2b_memory():
    d = memory.ModelDims.from_config(memory.QWEN2_VL_2B_CONFIG)
    counts = memory.param_counts(d)
    total = counts["vision"] + counts["decoder_layers"] + counts["embed"]  # lm_head tied in the checkpoint
    assert abs(total / 2.209e9 - 1) < 0.005  # Qwen2-VL-2B: 2.21B parameters
    assert memory.kv_bytes_per_token(d) == 2 * 28 * 2 * 128 * 2 == 28672
    est = memory.estimate_memory(d, image_hw=(448, 448), max_context=1024)
    assert est.image_tokens == 256
    assert est.kv_cache == (2 * 1024 + 256 + 64) * 28672  # decode ping-pong + a prompt-long prefix set
    assert est.vision_weights == counts["vision"] * 2
    assert est.decoder_weights == (counts["decoder_layers"] + counts["lm_head"]) * 2
    assert 4.5 * memory.GB < est.total < 6 * memory.GB  # fits an 8 GB Orin with room for OS + ROS
    big = memory.estimate_memory(d, image_hw=(1008, 1008), max_context=2048)
    assert big.activations > 10 * est.activations  # attention over patches is quadratic in image area
    assert big.total > 8 * memory.GB  # why 8 GB boards must bound the image size
    build16 = memory.estimate_build_memory(d, onnx_dtype_bytes=2, workspace_mb=512)
    build32 = memory.estimate_build_memory(d, onnx_dtype_bytes=4, workspace_mb=512)
    assert build32["total_mb"] - build16["total_mb"] == pytest.approx(build16["parsed_onnx_mb"], rel=1e-3)
    assert "total" in memory.format_estimate(est)


@pytest.mark.parametrize(("name", "billions", "layers", "fits_8gb"), [("QWEN3_VL_2B_CONFIG", 2.1275, 28, True),
                                                                      ("QWEN3_VL_4B_CONFIG", 4.4378, 36, False)])
def test_qwen3vl_real_size_memory(name, billions, layers, fits_8gb):
    """The arithmetic against Qwen3-VL-2B / 4B built from the same configs on the meta device (no
    weights): DeepStack mergers and the position grid included; head_dim 128 (not hidden / heads)
    sets the KV cache. In FP16 the 2B fits an 8 GB board at 448 x 448, the 4B does not."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = getattr(memory, name)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    d = memory.ModelDims.from_config(cfg)
    counts = memory.param_counts(d)
    lm = model.model.language_model
    assert counts["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    assert counts["decoder_layers"] == sum(p.numel() for p in lm.parameters()) - counts["embed"]
    assert abs((counts["vision"] + counts["decoder_layers"] + counts["embed"]) / (billions * 1e9) - 1) < 0.001
    assert memory.kv_bytes_per_token(d) == 2 * layers * 8 * 128 * 2
    est = memory.estimate_memory(d, image_hw=(448, 448), max_context=1024)
    assert est.image_tokens == 196  # 448 / 16 = 28 patches a side, 14 x 14 merged
    assert (est.total < 6 * memory.GB) == fits_8gb
    # weight-only INT4 / INT8 (the Q/DQ export): the Linear weights of the language model and the lm_head
    linear = [mod for mod in lm.modules() if isinstance(mod, torch.nn.Linear)] + [model.lm_head]
    assert memory.matmul_weight_counts(d) == (sum(mod.weight.numel() for mod in linear),
                                              sum(mod.out_features for mod in linear))
    int8 = memory.estimate_memory(d, image_hw=(448, 448), max_context=1024, weight_bits=8)
    int4 = memory.estimate_memory(d, image_hw=(448, 448), max_context=1024, weight_bits=4)
    lm_head = model.lm_head.weight.numel() * 2  # kept in fp16 by the Q/DQ export
    assert 0.49 < (int8.decoder_weights - lm_head) / (est.decoder_weights - lm_head) < 0.51
    assert 0.25 < (int4.decoder_weights - lm_head) / (est.decoder_weights - lm_head) < 0.27  # + a scale per 128
    assert int4.total < 6 * memory.GB  # INT4 puts even the 4B on an 8 GB board


# ------------------------------------------------------------------------------ real TensorRT (device only)
def _cuda_device_present() -> bool:
    try:
        from vlsi_model.export.tensorrt_build import gpu_info

        return bool(gpu_info().get("compute_capability", "?") != "?")
    except Exception:  # noqa: BLE001
        return False


def _assert_same_tokens(engine, reference) -> None:
    """Greedy tokens of `engine` equal `reference`'s on three random frames (answers of > 1 token)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8)
        a = reference.answer(image, "How many objects are there?", max_new_tokens=8)
        b = engine.answer(image, "How many objects are there?", max_new_tokens=8)
        assert b.token_ids == a.token_ids and len(b.token_ids) > 1


@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_build_and_run_engines_match_onnxruntime(request, model, tmp_path):
    pytest.importorskip("tensorrt")
    if not _cuda_device_present():
        pytest.skip("no CUDA device")
    from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
    from vlsi_model.engine.tensorrt_engine import TensorRTEngine
    from vlsi_model.export.tensorrt_build import build_engines

    # Qwen3-VL: the DeepStack output of the vision engine and input of the decoder engine
    export = export_once(request.getfixturevalue("tiny_qwen2vl_dir")) if model == "qwen2vl" else \
        request.getfixturevalue("qwen3vl_export")
    out = tmp_path / "engines"
    manifest = build_engines(export, out, precision="fp32", workspace_mb=512)
    assert (out / "vision.plan").is_file() and (out / "decoder.plan").is_file()
    assert manifest["source_export"]["onnx_sha256"]["decoder.onnx"] == mf.sha256_file(export / "decoder.onnx")
    trt_engine = TensorRTEngine(out)
    _assert_same_tokens(trt_engine, OnnxRuntimeEngine(export, num_threads=1))
    trt_engine.close()
    shutil.rmtree(out)


# ------------------------------------------------------------------------------ the builder on a fake TensorRT
# (the `fake_trt` fixture: conftest.py)
def _plan(out: Path, graph: str) -> dict:
    return json.loads((out / f"{graph}.plan").read_bytes())


def test_fp16_build_pins_the_rmsnorm_arithmetic_and_writes_checked_engines(fake_trt, export_dir, tmp_path):
    """Weakly typed fp16 from an fp32 export: FP16 + precision constraints, the decoder's two
    profiles, RMSNorm's pow / reduce / +eps / sqrt / division and softmax pinned to FP32 (and
    the same pinning in the printed trtexec lines), plans written with their size and sha256."""
    from vlsi_model.engine.tensorrt_engine import check_engine_files
    from vlsi_model.export.tensorrt_build import build_engines

    out = tmp_path / "engines"
    manifest = build_engines(export_dir, out, precision="fp16", progress=lambda msg: None)
    decoder = _plan(out, "decoder")
    assert not decoder["strongly_typed"]
    assert set(decoder["flags"]) == {"FP16", "PREFER_PRECISION_CONSTRAINTS"}
    assert len(decoder["profiles"]) == 3 and decoder["device"] == "GPU"
    pinned = manifest["engines"]["decoder"]["fp32_pinned_layer_names"]
    assert pinned and set(pinned) == set(decoder["fp32_layers"])
    import onnx

    graph = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    pinned_ops = {ops[name] for name in pinned}
    assert {"Pow", "ReduceMean", "Sqrt", "Softmax"} <= pinned_ops and pinned_ops & {"Div", "Reciprocal"}
    eps_adds = [n for n in graph.node if n.op_type == "Add" and any(
        i in {o for m in graph.node if m.op_type == "ReduceMean" for o in m.output} for i in n.input)]
    assert eps_adds and all(n.name in pinned for n in eps_adds)
    assert all(ops[name] != "MatMul" for name in pinned)  # the heavy math stays fp16
    trtexec = manifest["trtexec"][1]
    assert "--layerPrecisions=" in trtexec and pinned[0] + ":fp32" in trtexec
    check_engine_files(manifest, out)


def test_fp16_export_builds_strongly_typed_and_refuses_fp32(fake_trt, tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.export.tensorrt_build import build_engines

    fp16 = export_once(tiny_qwen2vl_dir, dtype="fp16")
    build_engines(fp16, tmp_path / "engines", precision="fp16", progress=lambda msg: None)
    decoder = _plan(tmp_path / "engines", "decoder")
    assert decoder["strongly_typed"] and decoder["flags"] == [] and decoder["fp32_layers"] == []
    with pytest.raises(BuildError, match="fp16 export"):
        build_engines(fp16, tmp_path / "fp32", precision="fp32", progress=lambda msg: None)


@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_the_backend_runs_its_engines_token_for_token_like_onnxruntime(request, fake_trt, model, tmp_path,
                                                                      monkeypatch):
    """The TensorRT backend's runtime logic in CI, on the fake TensorRT 10 runtime (engines built by
    the builder; each executes its ONNX graph with ONNX Runtime on fake device memory): shapes in
    the profiles, addresses, the KV cache's buffer sets (a step never writes the set it reads),
    the pad slot, DeepStack; the four contexts share one USER_MANAGED scratch buffer of the
    largest profile's size. Greedy tokens equal the ONNX Runtime backend's."""
    from vlsi_model.engine import tensorrt_engine
    from vlsi_model.engine.base import EngineError
    from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
    from vlsi_model.export.tensorrt_build import build_engines

    monkeypatch.setattr(tensorrt_engine, "load_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(tensorrt_engine, "_Cuda", fake_trt.FakeCuda)
    export = request.getfixturevalue("export_dir" if model == "qwen2vl" else "qwen3vl_export")
    out = tmp_path / "engines"
    build_engines(export, out, progress=lambda msg: None)
    engine = tensorrt_engine.TensorRTEngine(out)
    contexts = (engine._vision_ctx, engine._prefill_ctx, engine._decode_ctx, engine._extend_ctx)
    assert {ctx.strategy for ctx in contexts} == {fake_trt.ExecutionContextAllocationStrategy.USER_MANAGED}
    assert {ctx.device_memory for ctx in contexts} == {(engine._scratch, engine.scratch_bytes)}
    assert engine.scratch_bytes == max(engine._vision_engine.get_device_memory_size_for_profile_v2(0),
                                       *(engine._decoder_engine.get_device_memory_size_for_profile_v2(i)
                                         for i in range(3)))
    assert [ctx.active_optimization_profile for ctx in contexts] == [0, 0, 1, 2]
    _assert_same_tokens(engine, OnnxRuntimeEngine(export, num_threads=1))
    assert engine._decode_ctx.executions > 0
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.answer(np.zeros((60, 90, 3), dtype=np.uint8), "How many?")


@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_tensorrt_answer_many_shares_the_frame_and_prefix_and_answers_like_answer(request, fake_trt, model,
                                                                                  tmp_path, monkeypatch):
    """Several questions about one frame on the TensorRT backend (fake TensorRT 10 runtime, device
    memory uninitialised as on a GPU): one vision run, one prefill of the shared prefix (into the
    question tokens when the questions share some) into its own KV set, then each question's own
    tokens through the extend profile with the logits of its whole prompt's prefill; every answer
    the one `answer` gives, limits and cancels per question, a bad question fails the call before
    any work. A question longer than the extend profile and every question on engines built
    before it (two decoder profiles) are prefilled whole, still sharing the vision pass."""
    from vlsi_model.engine import tensorrt_engine
    from vlsi_model.engine.base import EngineError
    from vlsi_model.export import tensorrt_build

    monkeypatch.setattr(tensorrt_engine, "load_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(tensorrt_engine, "_Cuda", fake_trt.FakeCuda)
    export = request.getfixturevalue("export_dir" if model == "qwen2vl" else "qwen3vl_export")
    tensorrt_build.build_engines(export, tmp_path / "engines", progress=lambda msg: None)
    engine = tensorrt_engine.TensorRTEngine(tmp_path / "engines")
    extend_past = engine._decoder_engine.get_tensor_profile_shape("past_key_0", 2)[2][2]
    kv_tokens = [len(fake_trt.DEVICE_MEMORY[kv[0]]) for kv in engine._kv]  # decode pair + a prompt-long prefix set
    assert kv_tokens[0] == kv_tokens[1] > kv_tokens[2] == kv_tokens[0] * extend_past // engine.max_total
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    longer = "Which objects are left of the circle and " + "which are above the square and " * 12 + "where?"
    groups = {  # the prefix ends at the image / runs into the question ("What color is the")
        "image": (["How many objects are there?", "What color is the circle?", longer, "Is there a red square?",
                   "What objects are there?"], [8, 3, 4, 8, 1]),
        "words": (["What color is the circle?", "What color is the square?", "What color is the triangle?"],
                  [8, 2, 8]),
    }
    assert len(engine.prompts.prompt_ids(longer, 4)) > engine.max_extend + 10  # its own tokens exceed extend
    engine.warmup()  # runs every context once, the extend one included
    assert all(ctx.executions > 0 for ctx in (engine._vision_ctx, engine._prefill_ctx, engine._decode_ctx,
                                               engine._extend_ctx))
    first_logits, run = [], engine._run_decoder

    def recording(ctx, *args, **kw):  # the logits of every prefill / extend call (each question's first token)
        logits = run(ctx, *args, **kw)
        if ctx is not engine._decode_ctx:
            first_logits.append(logits.copy())
        return logits

    engine._run_decoder = recording
    for questions, limits in groups.values():
        first_logits.clear()
        alone = [engine.answer(image, q, max_new_tokens=n).token_ids for q, n in zip(questions, limits, strict=True)]
        alone_logits = list(first_logits)
        first_logits.clear()
        before = {name: getattr(engine, name).executions for name in ("_vision_ctx", "_prefill_ctx", "_extend_ctx")}
        together = engine.answer_many(image, questions, limits)
        ran = {name: getattr(engine, name).executions - n for name, n in before.items()}
        whole = sum(q == longer for q in questions)  # prefilled whole, after the shared prefix
        assert ran == {"_vision_ctx": 1, "_prefill_ctx": 1 + whole, "_extend_ctx": len(questions) - whole}
        assert [r.token_ids for r in together] == alone and any(len(t) > 1 for t in alone)
        for got, want in zip(first_logits[1:], alone_logits, strict=True):  # [0]: the prefix's own
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert together[0].vision_ms > 0 and all(r.vision_ms == 0 for r in together[1:])
    del engine._run_decoder
    questions, limits = groups["image"]
    stop = threading.Event()
    stop.set()
    cancelled = engine.answer_many(image, questions[:2], 8, cancels=[None, stop])
    assert cancelled[1].cancelled and not cancelled[1].token_ids and cancelled[0].token_ids
    runs = engine._vision_ctx.executions
    assert all(r.cancelled for r in engine.answer_many(image, questions[:2], 8, cancels=[stop, stop]))
    assert engine._vision_ctx.executions == runs  # nothing left to answer: no work
    with pytest.raises(EngineError, match="empty"):
        engine.answer_many(image, [questions[0], "  "], 8)
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.answer_many(image, questions[:2], [8, 0])
    assert engine._vision_ctx.executions == runs  # refused before any work
    assert engine.answer_many(image, [], 8) == []
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.answer_many(image, questions[:2], 8)

    two_profiles = tensorrt_build.compute_profiles  # what an older vlsi build-engine built
    monkeypatch.setattr(tensorrt_build, "compute_profiles", lambda *a: {
        g: p[:2] for g, p in two_profiles(*a).items()})
    manifest = tensorrt_build.build_engines(export, tmp_path / "old", progress=lambda msg: None)
    assert manifest["engines"]["decoder"]["profile_names"] == ["prefill", "decode"]
    old = tensorrt_engine.TensorRTEngine(tmp_path / "old")
    assert old._extend_ctx is None and len(old._kv) == 2
    before = old._vision_ctx.executions, old._prefill_ctx.executions
    assert [r.token_ids for r in old.answer_many(image, questions, limits)] == \
        [engine_alone.token_ids for engine_alone in (old.answer(image, q, max_new_tokens=n)
                                                     for q, n in zip(questions, limits, strict=True))]
    assert old._vision_ctx.executions - before[0] == 1 + len(questions)  # shared once + the answers alone
    assert old._prefill_ctx.executions - before[1] == 2 * len(questions)
    old.close()


def test_dla_core_is_checked_against_the_device(fake_trt, export_dir, tmp_path, monkeypatch):
    from vlsi_model.export.tensorrt_build import build_engines

    with pytest.raises(BuildError, match="has 0 DLA cores"):
        build_engines(export_dir, tmp_path / "nano", dla_core=0, progress=lambda msg: None)
    monkeypatch.setattr(fake_trt.Builder, "num_DLA_cores", 2)  # an AGX Orin
    build_engines(export_dir, tmp_path / "agx", dla_core=1, progress=lambda msg: None)
    vision = _plan(tmp_path / "agx", "vision")
    assert vision["device"] == "DLA" and vision["dla_core"] == 1 and "GPU_FALLBACK" in vision["flags"]


def test_a_profile_tensorrt_refuses_is_a_build_error(fake_trt, export_dir, tmp_path):
    from vlsi_model.export.tensorrt_build import build_engine_file

    bad = [{"pixel_values": {"min": [64, 1176], "opt": [16, 1176], "max": [256, 1176]}}]  # min > opt
    with pytest.raises(BuildError, match="refused optimisation profile 0"):
        build_engine_file(fake_trt, export_dir / "vision.onnx", tmp_path / "v.plan", bad, "fp16", False, 256,
                          None, None, lambda msg: None)


def test_an_input_shape_outside_the_profile_names_the_range():
    """`set_input_shape` returns False outside the profile; the engine says which range it was built for."""
    from vlsi_model.engine.base import EngineError
    from vlsi_model.engine.tensorrt_engine import TensorRTEngine

    class Ctx:
        def set_input_shape(self, name, shape):
            return shape[0] <= 256

    class Engine:
        def get_tensor_shape(self, name):
            return (-1, 1176)

        def get_tensor_profile_shape(self, name, profile):
            return [(4, 1176), (256, 1176), (256, 1176)]

    engine = object.__new__(TensorRTEngine)
    engine._set_shape(Ctx(), Engine(), "pixel_values", (200, 1176), 0)
    with pytest.raises(EngineError, match=r"pixel_values of shape \(300, 1176\).*\(4, 1176\) to \(256, 1176\)"):
        engine._set_shape(Ctx(), Engine(), "pixel_values", (300, 1176), 0)


def test_unknown_compute_capability_is_not_refused_forever():
    """A manifest written where cuda-python was missing has "?" for the compute capability: the
    runtime lets TensorRT decide at deserialization instead of refusing the engines forever."""
    check_engine_manifest(engine_manifest(gpu={"name": "Orin", "compute_capability": "?"}), "10.3.0", ORIN)
    with pytest.raises(EngineMismatchError, match="compute capability"):
        check_engine_manifest(engine_manifest(gpu={"name": "RTX", "compute_capability": "8.9"}), "10.3.0", ORIN)




def test_qwen3vl_profiles_and_fp16_build_carry_deepstack(fake_trt, qwen3vl_export, tmp_path):
    """Qwen3-VL's extra inputs get optimisation profiles like the others (position-grid taps per
    patch, DeepStack features per prompt token: all of them when prefilling, one when decoding),
    its per-head q/k RMSNorms are pinned to FP32 like the layer norms, and trtexec gets the same."""
    from vlsi_model.export.tensorrt_build import build_engines

    em = json.loads((qwen3vl_export / mf.MANIFEST_FILE).read_text())
    profiles = compute_profiles(em, default_ranges(em))
    (vision,) = profiles["vision"]
    assert vision["pos_indices"]["max"] == [vision["pixel_values"]["max"][0], 4]
    prefill, decode, extend = profiles["decoder"]
    hidden = em["text"]["hidden_size"]
    for key in ("min", "opt", "max"):
        assert prefill["deepstack_embeds"][key] == [2, 1, prefill["inputs_embeds"][key][1], hidden]
        assert decode["deepstack_embeds"][key] == [2, 1, 1, hidden]
        assert extend["deepstack_embeds"][key] == [2, 1, extend["inputs_embeds"][key][1], hidden]
    manifest = build_engines(qwen3vl_export, tmp_path / "engines", precision="fp16", progress=lambda msg: None)
    import onnx

    graph = onnx.load(str(qwen3vl_export / "decoder.onnx"), load_external_data=False).graph
    pows = [n.name for n in graph.node if n.op_type == "Pow"]
    # per layer: input, post-attention, q and k norms; plus the final norm
    assert len(pows) == 4 * em["text"]["num_layers"] + 1
    assert set(pows) <= set(manifest["engines"]["decoder"]["fp32_pinned_layer_names"])
    assert "deepstack_embeds:2x1x1x" in manifest["trtexec"][1]


def test_engines_go_to_a_named_set_that_engine_dir_finds_by_name(fake_trt, export_dir, tmp_path, monkeypatch, capsys):
    """`vlsi build-engine` writes a named set under trt_engines/ (default name: the model's, the
    run's name for a `final/` folder; --name picks one; VLSI_TRT_ENGINES moves the folder); a bare
    engine_dir name means that set everywhere, and backend auto finds a model's default set from
    the model directory alone (only a set built from that model); another model's set is not
    overwritten without --overwrite."""
    import shutil

    from vlsi_model.engine import _normalise, tensorrt_engine
    from vlsi_model.engine.tensorrt_engine import find_engine_dir
    from vlsi_model.engine_dirs import engine_set_name, resolve_engine_dir

    monkeypatch.setattr(tensorrt_engine, "tensorrt_available", lambda: True)  # the fake stands in
    root = tmp_path / "engines"
    monkeypatch.setenv("VLSI_TRT_ENGINES", str(root))
    em = json.loads((export_dir / mf.MANIFEST_FILE).read_text())
    model = Path(em["source_dir"])
    default = engine_set_name(model, em["model_name"])
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--fp16"]) == EXIT_OK
    assert f"engine_dir:={default}" in capsys.readouterr().err
    assert find_engine_dir("unused", resolve_engine_dir(default)) == root / default
    assert find_engine_dir(model) == root / default  # what backend auto / tensorrt do with just the model path
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--fp16", "--name", "student-fp16"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(root / "student-fp16")
    assert _normalise({"engine_dir": "student-fp16"})["engine_dir"] == root / "student-fp16"
    # a set wins over a same-named folder where the command runs; paths stay paths; "" is "not given"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "student-fp16").mkdir()
    assert resolve_engine_dir("student-fp16") == root / "student-fp16"
    assert _normalise({"engine_dir": "./student-fp16"})["engine_dir"] == Path("student-fp16")
    assert _normalise({"engine_dir": str(export_dir)})["engine_dir"] == export_dir
    assert "engine_dir" not in _normalise({"engine_dir": ""})
    # a copy of the model elsewhere is another model: its default set is not taken for it
    other = tmp_path / "copies" / model.name
    shutil.copytree(model, other)
    assert find_engine_dir(other) is None
    # a name is one folder name; another model's set is not replaced silently
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--name", "a/b"]) == EXIT_BAD_INPUT
    assert "one folder name" in capsys.readouterr().err
    em["source_dir"] = str(other)
    (root / "student-fp16" / mf.MANIFEST_FILE).write_text(json.dumps(em))
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--fp16", "--name", "student-fp16"]) == EXIT_BAD_INPUT
    assert "holds the engines of" in capsys.readouterr().err
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--fp16", "--name", "student-fp16",
                     "--overwrite"]) == EXIT_OK
    # nor a folder that is no engine set (a model directory given as --out by mistake)
    assert cli_main(["build-engine", "--onnx", str(export_dir), "--fp16", "--out", str(other)]) == EXIT_BAD_INPUT
    assert "holds no engine set" in capsys.readouterr().err


def test_default_set_names_come_from_the_run_not_its_final_folder():
    from vlsi_model.engine_dirs import engine_set_name, is_engine_name

    assert engine_set_name("/x/runs/my_robot/final") == "my_robot"
    assert engine_set_name("/x/runs/my_robot/final", "final") == "my_robot"
    assert engine_set_name("/x/models/student") == "student"
    assert engine_set_name("/x/runs/r/final", "default_student") == "default_student"
    assert [is_engine_name(t) for t in ("student", "a/b", "./x", "~/x", "..", "", " ")] == [
        True, False, False, False, False, False, False]
