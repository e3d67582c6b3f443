"""Qwen3-VL in the project: tiny config and image processor (patch 16, mean/std 0.5), save/load,
prompt layout, the distillation adapter against Hugging Face's own hidden states (DeepStack
included), the torch engine token for token against `generate`,
its ONNX export (DeepStack across the vision and decoder graphs) against Hugging Face and the
torch engine, a three-step `vlsi distill` of a tiny Qwen3-VL pair and `vlsi eval` / `vlsi ask`
on one."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import generation_helpers
import numpy as np
import pytest
import torch
import yaml

from vlsi_model.cli import main
from vlsi_model.data.question_families import make_questions
from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene
from vlsi_model.engine.base import EngineError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_PIXELS = 112 * 112
MAX_NEW = 10
TEXT_LAYERS = 3  # 2 DeepStack layers (the default) + 1 without


def scene(seed: int):
    """(image, questions) of a 128 x 96 synthetic scene (kept at that size: 12 merged image tokens)."""
    s = generate_scene(seed, SceneConfig(width=128, height=96))
    return render_scene(s), [qa.question for qa in make_questions(s, seed)]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tiny_tokenizer, torch_threads):
    """(model, tokenizer, processor, directory) of a tiny random Qwen3-VL saved with save_model_dir."""
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen3vl_config

    config = tiny_qwen3vl_config(tokenizer=tiny_tokenizer, num_layers=TEXT_LAYERS)
    model = build_model(config, seed=5)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=MAX_PIXELS, model_type="qwen3_vl")
    path = save_model_dir(model, tiny_tokenizer, processor, tmp_path_factory.mktemp("qwen3vl") / "model",
                          metadata={"placeholder": False, "test": True})
    return model, tiny_tokenizer, processor, path


@pytest.fixture(scope="module")
def loaded(qwen3):
    from vlsi_model.checkpoint import load_model_dir

    return load_model_dir(qwen3[3])


def hf_greedy(model, tok, proc, image, question, max_new_tokens=MAX_NEW):
    return generation_helpers.hf_greedy(model, tok, proc, image, question, max_new_tokens)


def strip_stop(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


# ------------------------------------------------------------------------------------ config / files
def test_config_and_processor(tiny_tokenizer, qwen3):
    from vlsi_model.models import (
        TokenIds,
        check_image_processor,
        make_image_processor,
        save_model_dir,
        tiny_qwen3vl_config,
    )

    model, _, processor, _ = qwen3
    cfg = model.config
    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    assert cfg.model_type == "qwen3_vl" and cfg.image_token_id == ids.image
    assert cfg.vision_start_token_id == ids.vision_start and cfg.video_token_id == ids.video
    assert cfg.vision_config.patch_size == 16 and cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    assert list(cfg.vision_config.deepstack_visual_indexes) == [0, 1]
    assert len(model.model.visual.deepstack_merger_list) == 2
    rope = cfg.text_config.rope_parameters
    assert rope["mrope_interleaved"] and sum(rope["mrope_section"]) == cfg.text_config.head_dim // 2
    assert (processor.patch_size, processor.merge_size) == (16, 2)
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    # Wrong combinations fail loudly rather than silently.
    with pytest.raises(ValueError, match="DeepStack indexes but only 1 text layers"):
        tiny_qwen3vl_config(tokenizer=tiny_tokenizer, num_layers=1)
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        tiny_qwen3vl_config(tokenizer=tiny_tokenizer, deepstack_visual_indexes=(0, 2))
    with pytest.raises(ValueError, match="special token id"):
        tiny_qwen3vl_config(vocab_size=8)
    qwen2_processor = make_image_processor(min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="patch_size=14 but the qwen3_vl model's vision tower expects 16"):
        check_image_processor(cfg, qwen2_processor)
    with pytest.raises(ValueError, match="patch_size=14"):
        save_model_dir(model, tiny_tokenizer, qwen2_processor, Path("/nonexistent/never_written"))
    with pytest.raises(ValueError, match="1024 <= min_pixels"):
        make_image_processor(min_pixels=900, max_pixels=MAX_PIXELS, model_type="qwen3_vl")
    from vlsi_model.growth import GrowthPlan, grow_language_model

    with pytest.raises(ValueError, match="growing a qwen3_vl model is not supported yet"):
        grow_language_model(model, GrowthPlan(num_layers=2 * TEXT_LAYERS))


def test_save_load_round_trip_and_prompt_layout(qwen3, loaded):
    from vlsi_model.prompting import build_inputs

    model, tok, processor, path = qwen3
    model2, tok2, processor2 = loaded
    assert type(model2).__name__ == "Qwen3VLForConditionalGeneration"
    saved = json.loads((path / "preprocessor_config.json").read_text())
    assert saved["patch_size"] == 16 and saved["image_mean"] == [0.5] * 3 and saved["image_std"] == [0.5] * 3
    assert (processor2.patch_size, list(processor2.image_mean), list(processor2.image_std)) == (16, [0.5] * 3,
                                                                                                [0.5] * 3)
    state, state2 = model.state_dict(), model2.state_dict()
    assert set(state) == set(state2) and all(torch.equal(state[k], state2[k]) for k in state)
    image, questions = scene(0)
    inputs = build_inputs(tok, processor, image, questions[0])
    inputs2 = build_inputs(tok2, processor2, image, questions[0])
    assert set(inputs) == set(inputs2) and all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    # 128x96 -> 128x96 (multiples of 32): grid 1 x 6 x 8 patches of 16 px -> 48 // 2**2 = 12 image tokens.
    grid = inputs["image_grid_thw"][0].tolist()
    assert grid == [1, 6, 8]
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 12 == int(inputs["mm_token_type_ids"].sum())
    assert inputs["pixel_values"].shape == (48, 3 * 2 * 16 * 16)
    assert hf_greedy(model, tok, processor, image, questions[0]) == hf_greedy(model2, tok2, processor2, image,
                                                                            questions[0])


# ------------------------------------------------------------------------------------ adapter
def test_adapter_matches_hf_hidden_states_with_deepstack(qwen3):
    """Layer i = HF's layer-i output + the DeepStack features at the image tokens (layers 0, 1),
    HF's layer-i output elsewhere (layer 2); final = HF's last_hidden_state."""
    from vlsi_model.distill.adapters import Qwen3VLAdapter, get_adapter
    from vlsi_model.prompting import build_inputs, collate

    model, tok, processor, _ = qwen3
    adapter = get_adapter(model)
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.num_layers(model) == TEXT_LAYERS
    assert adapter.final_norm(model) is model.model.language_model.norm and adapter.lm_head(model) is model.lm_head
    samples = []
    for seed in range(2):
        image, questions = scene(seed)
        samples.append(build_inputs(tok, processor, image, questions[0], "two"))
    batch = collate(samples, tok.pad_token_id)
    layers = model.model.language_model.layers
    hf_out: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: hf_out.__setitem__(i, out))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            hf = model.model(**adapter.model_inputs(batch), use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = adapter.forward_with_hidden_states(model, batch, range(TEXT_LAYERS))
        feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    deepstack = [torch.cat(f, dim=0) for f in feats.deepstack_features]
    assert len(deepstack) == 2
    image_mask = batch["input_ids"] == model.config.image_token_id
    for i in range(TEXT_LAYERS):
        if i < TEXT_LAYERS - 1:  # HF's output_hidden_states: the bare layer outputs (its last one is normed)
            assert torch.equal(hf_out[i], hf.hidden_states[i + 1])
        want = hf_out[i].clone()
        if i < len(deepstack):
            want[image_mask] = want[image_mask] + deepstack[i]
            # The DeepStack addition is real: the bare layer output is not layer i's stream.
            assert not torch.allclose(got.layers[i], hf_out[i])
        assert torch.equal(got.layers[i], want), f"layer {i}"
    assert torch.equal(got.final, hf.last_hidden_state)
    assert torch.equal(adapter.final_norm(model)(got.layers[TEXT_LAYERS - 1]), hf.last_hidden_state)
    with torch.no_grad():
        logits = adapter.forward_with_hidden_states(model, batch, [1], return_logits=True).final
        want_logits = model(**adapter.model_inputs(batch), use_cache=False).logits
    assert torch.equal(logits, want_logits)


def test_adapter_hooks_under_gradient_checkpointing_and_peft(qwen3):
    """The pre-hooks fire once per forward under activation checkpointing and LoRA, the captured
    states equal the plain forward's, and a loss on a captured DeepStack layer reaches LoRA."""
    from peft import LoraConfig, get_peft_model

    from vlsi_model.distill.adapters import get_adapter
    from vlsi_model.prompting import build_inputs, collate

    model, tok, processor, _ = qwen3
    image, questions = scene(1)
    batch = collate([build_inputs(tok, processor, image, questions[0], "two")], tok.pad_token_id)
    adapter = get_adapter(model)
    with torch.no_grad():
        ref = adapter.forward_with_hidden_states(model, batch, [0, 2])
    trained = copy.deepcopy(model)
    trained.activation_checkpointing_enable()
    trained.train()
    peft_model = get_peft_model(trained, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    calls = []
    layers = adapter.decoder_layers(peft_model)
    handle = layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        hs = adapter.forward_with_hidden_states(peft_model, batch, [0, 2])
        torch.testing.assert_close(hs.layers[0], ref.layers[0])  # LoRA B starts at zero
        torch.testing.assert_close(hs.layers[2], ref.layers[2])
        hs.layers[0].pow(2).mean().backward()
    finally:
        handle.remove()
    assert len(calls) == 1, "the pre-hook must fire once: not again in the checkpoint recomputation"
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and ".layers.0." in n]
    assert grads and all(g is not None for g in grads)
    assert not any(h._forward_pre_hooks for h in layers)  # the adapter's hooks are gone


# ------------------------------------------------------------------------------------ engine
def test_engine_greedy_tokens_equal_generate(loaded):
    from vlsi_model.engine.torch_engine import TorchEngine, uses_deepstack

    model, tok, proc = loaded
    assert uses_deepstack(model)
    engine = TorchEngine(model, tok, proc)
    answered = []
    for seed in range(3):
        image, questions = scene(seed)
        for question in questions[:2]:
            expected = strip_stop(hf_greedy(model, tok, proc, image, question), engine.stop_token_ids)
            result = engine.answer(image, question, max_new_tokens=MAX_NEW)
            assert result.token_ids == expected, (seed, question)
            assert result.text == tok.decode(expected, skip_special_tokens=True).strip()
            assert result.vision_ms > 0 and result.prefill_ms > 0 and result.decode_ms >= 0
            answered.append(tuple(result.token_ids))
    assert engine.decode_mode == "traced"
    assert len(set(answered)) > 1 and sum(len(a) for a in answered) >= 2 * len(answered)
    # Control: the same loop without DeepStack (what DecoderStep alone would compute) answers differently.
    engine._deepstack = False
    differ = 0
    for seed in range(3):
        image, questions = scene(seed)
        for question in questions[:2]:
            differ += engine.answer(image, question, max_new_tokens=MAX_NEW).token_ids != strip_stop(
                hf_greedy(model, tok, proc, image, question), engine.stop_token_ids)
    assert differ >= 1
    engine.close()


def test_answer_many_carries_deepstack_and_equals_answer(loaded):
    """Several questions on one frame: DeepStack added once in the shared prefix, every answer the
    one `answer` gives, on the traced and on the Hugging Face (eager) decode path."""
    from vlsi_model.engine.torch_engine import TorchEngine

    model, tok, proc = loaded
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    for m in (model, eager):
        engine = TorchEngine(m, tok, proc)
        image, questions = scene(5)
        questions = [*questions[:3], "How many objects are there?"]
        alone = [engine.answer(image, q, max_new_tokens=MAX_NEW).token_ids for q in questions]
        assert [r.token_ids for r in engine.answer_many(image, questions, MAX_NEW)] == alone


def test_engine_hf_forward_path_equals_generate(loaded):
    """Eager attention: prefill and decode through the Hugging Face text model and DynamicCache."""
    from vlsi_model.engine.torch_engine import TorchEngine

    model, tok, proc = loaded
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    engine = TorchEngine(eager, tok, proc)
    for seed in (3, 4):
        image, questions = scene(seed)
        expected = strip_stop(hf_greedy(eager, tok, proc, image, questions[0]), engine.stop_token_ids)
        assert engine.answer(image, questions[0], max_new_tokens=MAX_NEW).token_ids == expected
    assert engine.decode_mode == "hf"


# ------------------------------------------------------------------------------------ ONNX export
@pytest.fixture(scope="module")
def exported(qwen3, tmp_path_factory):
    """(export directory, manifest) of the tiny Qwen3-VL (fp32, the processor's own resize).
    Not under the model's onnx/: the CLI tests below rely on auto picking torch."""
    from vlsi_model.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("qwen3vl_export") / "onnx"
    return out, export_model(qwen3[3], out)


def test_export_carries_deepstack_and_matches_pytorch(qwen3, exported):
    """vision graph -> image embeddings + DeepStack features, decoder graph with their input,
    every difference to the Hugging Face model (vision, DeepStack, prefill, decode) within fp32
    tolerance, and the graphs in TensorRT 10's operator set."""
    model = qwen3[0]
    _, manifest = exported
    hidden = model.config.text_config.hidden_size
    assert manifest["model_type"] == "qwen3_vl"
    assert manifest["text"]["deepstack_layers"] == 2 and manifest["text"]["mrope_interleaved"] is True
    assert manifest["vision"]["position_grid"] == 8 and manifest["vision"]["deepstack_visual_indexes"] == [0, 1]
    vision, decoder = manifest["graphs"]["vision"], manifest["graphs"]["decoder"]
    assert vision["outputs"]["deepstack_embeds"]["shape"] == [2, "image_tokens", hidden]
    assert vision["inputs"]["pos_indices"]["shape"] == ["patches", 4]
    assert vision["inputs"]["pos_indices"]["dtype"] == "int32"
    assert decoder["inputs"]["deepstack_embeds"]["shape"] == [2, 1, "seq", hidden]
    parity = manifest["parity"]
    assert set(parity) >= {"vision_max_abs_diff", "deepstack_max_abs_diff", "prefill_logits_max_abs_diff",
                           "decode_logits_max_abs_diff"}
    assert max(v for k, v in parity.items() if k.endswith("max_abs_diff")) < 1e-4 and parity["same_argmax"] == 1.0
    for graph in manifest["checks"].values():
        assert graph["tensorrt10_ops"] == "ok"


def test_onnxruntime_answers_token_for_token_like_torch(loaded, exported):
    from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
    from vlsi_model.engine.torch_engine import TorchEngine

    ort_engine = OnnxRuntimeEngine(exported[0], num_threads=1)
    torch_engine = TorchEngine(*loaded)
    try:
        for seed in (0, 1, 2):
            image, questions = scene(seed)
            for question in questions[:2]:
                want = torch_engine.answer(image, question, max_new_tokens=MAX_NEW)
                got = ort_engine.answer(image, question, max_new_tokens=MAX_NEW)
                assert got.token_ids == want.token_ids and got.text == want.text
            # several questions on the frame: DeepStack added once, in the shared prefix's prefill
            together = ort_engine.answer_many(image, [*questions[:3], "How many objects are there?"], MAX_NEW)
            assert [r.token_ids for r in together] == [
                torch_engine.answer(image, q, max_new_tokens=MAX_NEW).token_ids
                for q in [*questions[:3], "How many objects are there?"]]
    finally:
        ort_engine.close()
        torch_engine.close()


def test_deepstack_and_the_position_grid_reach_the_logits(exported):
    """The export would pass parity by luck if the features it adds were negligible: zeroing the
    DeepStack input or the position-grid weights moves the prefill logits far beyond tolerance."""
    from vlsi_model.engine import np_inputs
    from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(exported[0], num_threads=1)
    try:
        image, questions = scene(0)
        prep = engine.prepare(image, questions[0])
        ids, grid = prep["input_ids"], prep["grid_thw"]
        embeds, deepstack = engine.run_vision(prep["pixel_values"], grid)
        logits = engine.prefill(ids, engine.embed(ids, embeds), grid, deepstack)[0]
        without = engine.prefill(ids, engine.embed(ids, embeds), grid, np.zeros_like(deepstack))[0]
        assert np.abs(logits - without).max() > 1e-2
        with pytest.raises(EngineError, match="DeepStack features for 2 layers"):
            engine.prefill(ids, engine.embed(ids, embeds), grid, None)
        feeds = np_inputs.vision_aux_inputs(grid, engine.vision_spec, engine.vision_inv_freq)
        feeds["pixel_values"] = prep["pixel_values"]
        feeds["pos_weights"] = np.zeros_like(feeds["pos_weights"])
        no_grid = engine._vision.run(None, feeds)[0]
        assert np.abs(no_grid - embeds).max() > 1e-2
    finally:
        engine.close()


@pytest.mark.parametrize("options", [{"dtype": "fp16"}, {"image_size": (96, 128)},
                                     pytest.param({"exporter": "dynamo", "opset": 18}, marks=[
                                         pytest.mark.slow, pytest.mark.skipif(
                                             not os.environ.get("VLSI_SLOW_TESTS"),
                                             reason="dynamo export takes ~10 s; set VLSI_SLOW_TESTS=1")])])
def test_export_variants_keep_parity(qwen3, tmp_path, options):
    """fp16 (the Jetson build's input), a fixed image size (a static vision graph) and the dynamo
    exporter all carry DeepStack and stay within their tolerance of PyTorch."""
    from vlsi_model.export.onnx_export import TOLERANCE, ExportOptions, export_model

    manifest = export_model(qwen3[3], tmp_path / "onnx", ExportOptions(**options))
    parity = manifest["parity"]
    assert "deepstack_max_abs_diff" in parity and parity["same_argmax"] == 1.0
    assert max(v for k, v in parity.items() if k.endswith("max_abs_diff")) < TOLERANCE[manifest["dtype"]]
    if "image_size" in options:
        assert manifest["graphs"]["vision"]["inputs"]["pos_indices"]["shape"] == [48, 4]


def test_cli_export_and_ask_with_onnxruntime(qwen3, loaded, tmp_path, capsys):
    path = qwen3[3]
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(path), "--out", str(out)]) == 0
    image, _ = scene(1)
    from PIL import Image

    image_file = tmp_path / "frame.png"
    Image.fromarray(image).save(image_file)
    capsys.readouterr()
    assert main(["ask", "--model", str(out), "--backend", "onnxruntime", "--image", str(image_file),
                 "--question", "How many shapes?", "--max-new-tokens", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    model, tok, proc = loaded
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), *model.generation_config.eos_token_id}
    assert answer["backend"] == "onnxruntime"
    assert answer["token_ids"] == strip_stop(hf_greedy(model, tok, proc, image, "How many shapes?", 5), stop)


# ------------------------------------------------------------------------------------ CLI
def test_vlsi_eval_and_ask(qwen3, loaded, tmp_path, capsys):
    """`vlsi eval` on a `vlsi data scenes` file: its predictions are HF generate's answers."""
    model, tok, proc = loaded
    path = qwen3[3]
    data_dir = tmp_path / "scenes"
    assert main(["data", "scenes", "--out", str(data_dir), "--num", "2", "--split", "test", "--size", "128x96",
                 "--families", "count,exist", "--no-progress"]) == 0
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(path), "--data", str(data_dir / "test.json"), "--out", str(out),
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().out
    results = json.loads(out.read_text())
    rows = results["predictions"]
    assert results["backend"] == "torch" and len(rows) == results["overall"]["n"] == 4
    from vlsi_model.data.llava import load_image
    from vlsi_model.evaluation import load_eval_samples

    samples = load_eval_samples(data_dir / "test.json")
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), *model.generation_config.eos_token_id}
    for row, sample in zip(rows[:2], samples[:2], strict=True):
        expected = strip_stop(hf_greedy(model, tok, proc, load_image(sample.image), sample.question, 6), stop)
        assert row["prediction"] == tok.decode(expected, skip_special_tokens=True).strip()

    image_file = data_dir / "images" / "test_000000.png"
    assert main(["ask", "--model", str(path), "--image", str(image_file), "--question", "How many shapes?",
                 "--max-new-tokens", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["backend"] == "torch"  # auto: no export or engines beside the model
    assert answer["token_ids"] == strip_stop(hf_greedy(model, tok, proc, load_image(image_file), "How many shapes?", 4),
                                             stop)


# ------------------------------------------------------------------------------------ distillation
def test_three_step_distill_of_a_qwen3vl_pair(tmp_path_factory, tiny_tokenizer):
    """Teacher 8 layers x 64 wide, student 4 x 32 (different vocab padding, one tokenizer):
    verbalize, interact (LoRA), SFT; the final student loads and answers; a teacher cache
    reproduces the online interaction step."""
    from distill_helpers import STUDENT_LAYERS, STUDENT_VOCAB, TEACHER_LAYERS, TEACHER_VOCAB

    from vlsi_model.checkpoint import load_model_dir, read_metadata
    from vlsi_model.data.llava import load_image
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.engine import load_engine
    from vlsi_model.models import build_model, make_image_processor, save_model_dir, tiny_qwen3vl_config

    root = tmp_path_factory.mktemp("distill_qwen3vl")
    processor = make_image_processor(min_pixels=32 * 32, max_pixels=64 * 64, model_type="qwen3_vl")
    student = build_model(tiny_qwen3vl_config(tokenizer=tiny_tokenizer, vocab_size=STUDENT_VOCAB, hidden_size=32,
                                              num_layers=STUDENT_LAYERS, vision_hidden_size=32), seed=11)
    teacher = build_model(tiny_qwen3vl_config(tokenizer=tiny_tokenizer, vocab_size=TEACHER_VOCAB, hidden_size=64,
                                              num_layers=TEACHER_LAYERS, vision_depth=3,
                                              deepstack_visual_indexes=(0, 1, 2)), seed=12)
    save_model_dir(student, tiny_tokenizer, processor, root / "student")
    save_model_dir(teacher, tiny_tokenizer, processor, root / "teacher")
    data = write_dataset(root / "data", 6, seed=0, config=SceneConfig(width=64, height=64),
                         families=("caption", "count"))
    out = root / "out"
    cfg = {
        "output_dir": str(out),
        "teacher": {"path": str(root / "teacher")},
        "student": {"path": str(root / "student")},
        "data": {"train": str(data), "max_length": 256},
        "verbalizers": {"student": {"layers": [1, 2, 3]}, "teacher": {"stride": 2, "start": 1}, "chunk_tokens": 32},
        "matching": {"variant": "full", "seed": 0},
        "loss": {"chunk_tokens": 32},
        "lora": {"r": 4, "alpha": 4},
        "train": {"max_steps": 2, "per_device_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every_steps": 1,
                  "save_every_steps": 2},
        "steps": {"interact": {"max_steps": 3}},
    }
    (root / "distill.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(root / "distill.yaml")]) == 0

    assert json.loads((out / "teacher_verbalizers" / "verbalizers.json").read_text())["target_layers"] == [1, 3, 5, 7]
    verbalized = json.loads((out / "student_verbalized" / "verbalizers" / "verbalizers.json").read_text())
    assert verbalized["model_type"] == "qwen3_vl" and verbalized["target_layers"] == [1, 2, 3]
    stats = json.loads((out / "interaction" / "matching_stats.json").read_text())
    assert stats["student_layers"] == [1, 2, 3] and stats["teacher_layers"] == [1, 3, 5, 7]
    assert sum(map(sum, stats["overall"]["counts"])) == 3 * 3
    for run in ("verbalize_teacher", "verbalize_student", "interact", "sft"):
        metrics = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert losses and all(torch.isfinite(torch.tensor(losses))), run
    final, _, final_proc = load_model_dir(out / "final")
    assert type(final).__name__ == "Qwen3VLForConditionalGeneration" and final_proc.patch_size == 16
    assert not any("lora" in k for k in final.state_dict())
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, student.state_dict()[k])]
    assert any(".layers." in k for k in changed)
    assert read_metadata(out / "final")["step"] == "sft"
    engine = load_engine(out / "final", backend="torch")
    try:
        result = engine.answer(load_image(data.parent / "images" / "train_000000.png"), "How many shapes are there?",
                               max_new_tokens=4)
    finally:
        engine.close()
    assert isinstance(result.text, str) and 1 <= result.num_tokens <= 4

    # The teacher cache (precomputed verbalized teacher distributions) reproduces the online step 2.
    cached = root / "cached"
    cached.mkdir()
    for name in ("teacher_verbalizers", "student_verbalized"):
        shutil.copytree(out / name, cached / name)
    (root / "cached.yaml").write_text(yaml.safe_dump({
        **cfg, "output_dir": str(cached), "teacher_cache": {"enabled": True, "k": 100000, "batch_size": 3}}))
    assert main(["distill", "--config", str(root / "cached.yaml"), "--steps", "interact"]) == 0

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "runs" / "interact" / "metrics.jsonl").read_text().splitlines()]

    assert len(rows(out)) == len(rows(cached)) == 3
    for r_online, r_cached in zip(rows(out), rows(cached), strict=True):
        for key in ("loss", "loss_intermediate", "loss_last", "match_mean_teacher_layer"):
            assert r_cached[key] == pytest.approx(r_online[key], rel=1e-4, abs=1e-6), key


def test_vlsi_train_from_config_qwen3vl_with_frozen_vision(tmp_path):
    """`vlsi train` builds a fresh small Qwen3-VL (family qwen3_vl: patch-16 processor) and
    `freeze_vision` keeps the vision tower, DeepStack mergers included, as it was."""
    from safetensors.torch import load_file

    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.models import build_model, freeze_vision, tiny_qwen3vl_config
    data = write_dataset(tmp_path / "data", 4, seed=1, config=SceneConfig(width=64, height=64), families=("count",))
    architecture = {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32}
    model = {"from_config": {"family": "qwen3_vl", "train_tokenizer_on": "data", "vocab_size": 300, "seed": 3,
                             "architecture": architecture, "min_pixels": 1024, "max_pixels": 64 * 64},
             "freeze_vision": True}
    out = tmp_path / "run"
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "model": model, "data": {"train": str(data), "max_length": 128},
        "train": {"output_dir": str(out), "max_steps": 2, "per_device_batch_size": 2, "warmup_steps": 1, "lr": 3e-3,
                  "log_every_steps": 1, "save_every_steps": 2}}))
    assert main(["train", "--config", str(tmp_path / "sft.yaml")]) == 0
    loaded, tokenizer, processor = load_model_dir(out / "final")
    assert loaded.config.model_type == "qwen3_vl" and loaded.config.text_config.hidden_size == 32
    assert processor.patch_size == 16 and list(processor.image_mean) == [0.5] * 3
    # The same seed and architecture rebuild the untrained start: the vision tower did not move.
    start = build_model(tiny_qwen3vl_config(tokenizer=tokenizer, **architecture), seed=3).state_dict()
    final = load_file(str(out / "final" / "model.safetensors"))
    vision = [k for k in final if k.startswith("model.visual.")]
    assert any("deepstack_merger_list" in k for k in vision)
    assert all(torch.equal(final[k], start[k]) for k in vision)
    assert any(not torch.equal(final[k], start[k]) for k in final if k.startswith("model.language_model.layers."))
    # include_merger=False leaves the merger and the DeepStack mergers trainable.
    fresh = build_model(tiny_qwen3vl_config(tokenizer=tokenizer, **architecture), seed=3)
    freeze_vision(fresh, include_merger=False)
    trainable = {n for n, p in fresh.model.visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("merger.", "deepstack_merger_list.")) for n in trainable)
    assert any(n.startswith("deepstack_merger_list.") for n in trainable)


@pytest.mark.parametrize(("name", "millions"), [("QWEN3_VL_2B_CONFIG", 88.080384), ("QWEN3_VL_4B_CONFIG", 176.9472)])
def test_verbalizers_of_the_real_sizes(name, millions):
    """The README's verbalizer sizes: the project's own Verbalizers at the default targets of the
    real configs, built on the meta device."""
    from vlsi_model.distill.verbalizer import Verbalizers, select_target_layers
    from vlsi_model.export import memory

    text = getattr(memory, name)["text_config"]
    with torch.device("meta"):
        verb = Verbalizers(text["hidden_size"], select_target_layers(text["num_hidden_layers"]))
    assert sum(p.numel() for p in verb.parameters()) == round(millions * 1e6)
