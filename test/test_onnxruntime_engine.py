"""OnnxRuntimeEngine: numpy inputs identical to the PyTorch path, greedy tokens identical to the
torch backend on benchmark-style scene questions (Qwen2-VL and Qwen2.5-VL), streaming, cancel,
errors, no torch at run time, and backend selection by `load_engine`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from onnx_helpers import export_once

from vlsi_model.checkpoint import load_model_dir
from vlsi_model.data import question_families, render, scenes
from vlsi_model.engine import available_backends, load_engine
from vlsi_model.engine import np_inputs as npi
from vlsi_model.engine.base import EngineError, ModelLoadError
from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
from vlsi_model.engine.torch_engine import TorchEngine
from vlsi_model.models import make_image_processor
from vlsi_model.prompting import build_inputs, preprocess_image, validate_image, validate_question

MAX_NEW = 12


def bench_style_inputs(n_scenes: int = 5):
    """(image, question) pairs like `vlsi bench`'s: camera-sized frames, every question family."""
    out = []
    for i in range(n_scenes):
        seed = scenes.scene_seed("test", 0, i)
        scene = scenes.generate_scene(seed, scenes.SceneConfig(width=320, height=240))
        image = render.render_scene(scene)
        out += [(image, qa.question) for qa in question_families.make_questions(scene, seed)[:3]]
    return out


@pytest.fixture(scope="module", params=["tiny_qwen2vl_dir", "tiny_qwen25vl_dir"])
def engines(request):
    """(torch engine, onnxruntime engine) of one tiny model. Torch runs single-threaded here:
    for models this small, 2 threads on 2 shared (busy) cores are up to 8x slower than 1."""
    model_dir = request.getfixturevalue(request.param)
    ort_engine = OnnxRuntimeEngine(export_once(model_dir), num_threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchEngine.from_dir(model_dir), ort_engine
    torch.set_num_threads(threads)
    ort_engine.close()


# ------------------------------------------------------------------------------ numpy inputs == torch path
@pytest.mark.parametrize("max_pixels", [112 * 112, 28 * 28 * 1280])
def test_numpy_patchify_equals_image_processor_exactly(max_pixels):
    proc = make_image_processor(min_pixels=56 * 56, max_pixels=max_pixels)
    cfg = npi.ImageConfig(min_pixels=56 * 56, max_pixels=max_pixels)
    rng = np.random.default_rng(0)
    shapes = [(480, 640), (37, 501), (300, 20), (28, 28), (1, 150), (999, 777)]
    for h, w in shapes:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if max(h, w) / min(h, w) > 200:
            continue
        ref_pixels, ref_grid = preprocess_image(proc, validate_image(image))
        pixels, grid = npi.preprocess_image(npi.validate_image(image), cfg)
        assert grid == tuple(ref_grid[0].tolist()), (h, w)
        assert pixels.dtype == np.float32
        assert np.array_equal(pixels, ref_pixels.numpy()), (h, w)


def test_image_config_reads_preprocessor_json(tiny_qwen2vl_dir):
    cfg = npi.ImageConfig.from_json(tiny_qwen2vl_dir / "preprocessor_config.json")
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.merge_size) == (56 * 56, 112 * 112, 14, 2)
    assert cfg.resample == 3 and cfg.image_mean == npi.OPENAI_CLIP_MEAN


def test_prompt_ids_equal_build_inputs(tiny_qwen2vl_dir):
    _, tok, proc = load_model_dir(tiny_qwen2vl_dir)
    builder = npi.PromptBuilder.from_dir(tiny_qwen2vl_dir)
    image = np.zeros((60, 90, 3), np.uint8)
    for q in ["How many objects are there?", "  Is the door open?  ", "x", "<|im_end|><|image_pad|> sneaky",
              "Qué color tiene el círculo? 🤖"]:
        ref = build_inputs(tok, proc, image, q)
        n_img = int(ref["image_grid_thw"][0].prod()) // 4
        ids = builder.prompt_ids(npi.validate_question(q, 1000), n_img)
        assert np.array_equal(ids, ref["input_ids"][0].numpy()), q
        # kept for the next frame (standing questions), read-only so no caller can change the kept one
        assert builder.prompt_ids(npi.validate_question(q, 1000), n_img) is ids and not ids.flags.writeable
    assert not np.array_equal(builder.prompt_ids("x", 4), builder.prompt_ids("x", 6))  # keyed by image tokens too
    for i in range(builder.CACHED_PROMPTS + 10):  # many different questions: the oldest are dropped
        builder.prompt_ids(f"question {i}?", 4)
    assert len(builder._prompts) == builder.CACHED_PROMPTS


def test_validators_match_prompting():
    # one implementation (engine.validation), imported by both: nothing to drift apart
    assert npi.validate_image is validate_image and npi.validate_question is validate_question
    bad_images = [np.zeros((4, 4, 3), np.float32), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8),
                  "img", np.zeros((2, 500, 3), np.uint8), np.zeros((20000, 3, 3), np.uint8)]
    for image in bad_images:
        with pytest.raises(EngineError) as a:
            validate_image(image)
        with pytest.raises(EngineError) as b:
            npi.validate_image(image)
        assert str(a.value) == str(b.value)
    assert np.array_equal(npi.validate_image(np.ones((5, 6), np.uint8)), validate_image(np.ones((5, 6), np.uint8)))
    for q in ["", "   ", 3, "y" * 1001]:
        with pytest.raises(EngineError) as a:
            validate_question(q, 1000)
        with pytest.raises(EngineError) as b:
            npi.validate_question(q, 1000)
        assert str(a.value) == str(b.value)


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_qwen25vl_dir"])
def test_rope_index_and_rotary_equal_the_model(request, fixture):
    model, tok, proc = load_model_dir(request.getfixturevalue(fixture))
    for h, w in [(60, 90), (112, 56), (30, 30)]:
        inputs = build_inputs(tok, proc, np.zeros((h, w, 3), np.uint8), "What is this?")
        ref_pos, ref_delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                        inputs["image_grid_thw"])
        grid = tuple(inputs["image_grid_thw"][0].tolist())
        pos, delta = npi.rope_index(inputs["input_ids"][0].numpy(), model.config.image_token_id, grid, 2)
        assert np.array_equal(pos, ref_pos[:, 0].numpy()) and delta == int(ref_delta)
        lm = model.model.language_model
        cos_ref, sin_ref = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), ref_pos)
        cos, sin = npi.mrope_cos_sin(pos, lm.rotary_emb.inv_freq.numpy(),
                                     lm.config.rope_parameters["mrope_section"])
        np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
        np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)


def test_vision_index_math_equals_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    for grid in [(1, 8, 12), (1, 4, 4), (1, 10, 14), (1, 2, 30)]:
        g = torch.tensor([grid])
        assert np.array_equal(npi.vision_position_ids(grid, 2), get_vision_position_ids(g, 2).numpy())
        for window in (56, 112):
            ref_index, ref_cu = get_vision_window_index(g, 2, window, 14)
            order, window_ids = npi.window_index(grid, 2, window, 14)
            assert np.array_equal(order, ref_index.numpy())
            # window ids <-> cu_window_seqlens: same segment boundaries
            boundaries = np.flatnonzero(np.diff(window_ids)) + 1
            assert np.array_equal(np.concatenate([[0], boundaries, [len(window_ids)]]), ref_cu.numpy())


def test_qwen3vl_position_grid_taps_and_interleaved_rotary_equal_transformers():
    """Qwen3-VL's index math: the bilinear taps of its learned position grid are transformers'
    own indices and weights bit for bit (any grid, any table side), and the interleaved M-RoPE
    equals Qwen3VLTextRotaryEmbedding."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    for grid, side in [((1, 6, 8), 8), ((1, 4, 4), 48), ((1, 30, 22), 48), ((1, 2, 2), 8), ((1, 2, 64), 48)]:
        ref_i, ref_w = get_vision_interpolation_indices_and_weights(
            torch.tensor([grid]), side, mode="bilinear", align_corners=True, spatial_merge_size=2)
        indices, weights = npi.position_grid_taps(grid, 2, side)
        assert indices.dtype == np.int32 and np.array_equal(indices, ref_i.numpy())
        assert np.array_equal(weights, ref_w.numpy())
    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=4, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True})
    rotary = Qwen3VLTextRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(12), torch.arange(12) * 2 + 3, torch.arange(12) % 4])
    cos_ref, sin_ref = rotary(torch.zeros(1), pos[:, None])
    cos, sin = npi.mrope_cos_sin(pos.numpy(), rotary.inv_freq.numpy(), [6, 5, 5], interleaved=True)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)
    plain, _ = npi.mrope_cos_sin(pos.numpy(), rotary.inv_freq.numpy(), [6, 5, 5])
    assert np.abs(plain - cos).max() > 0.1  # the layouts really differ: the flag is not cosmetic


def test_deepstack_features_land_on_the_image_tokens():
    ids = np.array([5, 9, 9, 7, 9, 3])
    features = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = npi.deepstack_at_tokens(ids, 9, features, 2, np.float16)
    assert out.shape == (2, 1, 6, 4) and out.dtype == np.float16
    assert np.array_equal(out[:, 0, [1, 2, 4]], features) and not out[:, 0, [0, 3, 5]].any()
    with pytest.raises(EngineError, match="DeepStack features for 2 layers and 3 image tokens"):
        npi.deepstack_at_tokens(ids, 9, features[:, :2], 2, np.float32)


# ------------------------------------------------------------------------------ token parity
def test_same_greedy_tokens_as_torch_backend(engines):
    torch_engine, ort_engine = engines
    pairs = bench_style_inputs()
    assert len(pairs) >= 10
    for image, question in pairs:
        a = torch_engine.answer(image, question, max_new_tokens=MAX_NEW)
        b = ort_engine.answer(image, question, max_new_tokens=MAX_NEW)
        assert b.token_ids == a.token_ids, question
        assert b.text == a.text
        assert not b.cancelled


def test_the_raw_binding_gives_the_documented_binding_s_tokens(engines):
    """The decode loop runs one layer under onnxruntime's IO-binding wrapper for speed; where
    those internals are missing it must fall back to the wrapper, with the same logits."""
    from vlsi_model.engine import onnxruntime_engine as ore

    _, engine = engines
    assert engine._raw_binding is not None  # the pinned onnxruntime has them: the fast path is what runs
    pairs = bench_style_inputs(2)
    fast = [engine.answer(image, question, max_new_tokens=MAX_NEW) for image, question in pairs]
    raw = engine._raw_binding
    try:
        engine._raw_binding = None
        slow = [engine.answer(image, question, max_new_tokens=MAX_NEW) for image, question in pairs]
        ids = engine.prepare(*pairs[0])
        embeds, _ = engine.run_vision(ids["pixel_values"], ids["grid_thw"])
        documented = engine.prefill(ids["input_ids"], engine.embed(ids["input_ids"], embeds), ids["grid_thw"])[0]
    finally:
        engine._raw_binding = raw
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    logits = engine.prefill(ids["input_ids"], engine.embed(ids["input_ids"], embeds), ids["grid_thw"])[0]
    np.testing.assert_array_equal(logits, documented)
    assert ore._raw_binding_api(object()) is None  # a session without the internals: the wrapper is used

    class OtherSignature:  # an onnxruntime whose pybind binding takes other arguments
        cpu = None

        @staticmethod
        def binding_type(session):
            raise TypeError("__init__(): incompatible constructor arguments")

    try:
        engine._raw_binding = OtherSignature()
        assert engine.answer(*pairs[0], max_new_tokens=MAX_NEW).token_ids == fast[0].token_ids
        assert engine._raw_binding is None  # gave up on the raw path for good
        # and mid-answer: the cache the raw path left (pybind OrtValues) goes on through the wrapper
        engine._raw_binding = raw
        _, past, _ = engine.prefill(ids["input_ids"], engine.embed(ids["input_ids"], embeds), ids["grid_thw"])
        want, _ = engine.decode_step(5, len(ids["input_ids"]), past)
        engine._raw_binding = None
        got, _ = engine.decode_step(5, len(ids["input_ids"]), past)
        np.testing.assert_array_equal(got, want)
    finally:
        engine._raw_binding = raw


def test_answer_many_shares_the_frame_and_prefix_and_answers_like_answer(engines):
    """Several questions about one frame (the worker's grouping): the frame resized and encoded
    once, the common prefix prefilled once and read by every question without a copy, each answer
    the one `answer` gives; limits and cancels per question; a bad question fails the call."""
    _, engine = engines
    image = bench_style_inputs(1)[0][0]
    questions = ["What color is the circle?", "What color is the square?", "How many objects are there?",
                 "Is there a red circle?", "What objects are there?"]
    limits = [MAX_NEW, 3, MAX_NEW, 1, MAX_NEW]
    alone = [engine.answer(image, q, max_new_tokens=n) for q, n in zip(questions, limits, strict=True)]
    calls, extends = [], []
    vision, extend = engine.run_vision, engine._extend
    engine.run_vision = lambda *a: (calls.append(1), vision(*a))[1]
    engine._extend = lambda embeds, *a: (extends.append(embeds.shape[1]), extend(embeds, *a))[1]
    try:
        together = engine.answer_many(image, questions, limits)
    finally:
        del engine.run_vision, engine._extend
    assert len(calls) == 1
    # one prefill of the shared prefix (image tokens included), then each question's own tokens only
    prompts = [engine.prepare(image, q)["input_ids"] for q in questions]
    assert len(extends) == 1 + len(questions) and extends[0] + extends[1] == len(prompts[0])
    assert all(extends[0] + n == len(p) for n, p in zip(extends[1:], prompts, strict=True))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert together[0].vision_ms > 0 and all(r.vision_ms == 0 for r in together[1:])
    assert all(r.total_ms >= r.decode_ms > 0 for r in together)
    stop = threading.Event()
    stop.set()
    cancelled = engine.answer_many(image, questions[:2], MAX_NEW, cancels=[None, stop])
    assert cancelled[1].cancelled and not cancelled[1].token_ids and cancelled[0].token_ids == alone[0].token_ids
    with pytest.raises(EngineError, match="empty"):
        engine.answer_many(image, [questions[0], "  "], MAX_NEW)
    assert engine.answer_many(image, [], MAX_NEW) == []


def test_stop_token_ends_the_answer_like_torch(engines):
    """Make a token the model produces mid-answer a stop token: both backends stop there."""
    torch_engine, ort_engine = engines
    image, question = bench_style_inputs(1)[0]
    free = torch_engine.answer(image, question, max_new_tokens=MAX_NEW).token_ids
    stop = free[2]
    saved_t, saved_o = torch_engine.stop_token_ids, ort_engine.stop_token_ids
    try:
        torch_engine.stop_token_ids = saved_t | {stop}
        ort_engine.stop_token_ids = saved_o | {stop}
        a = torch_engine.answer(image, question, max_new_tokens=MAX_NEW)
        b = ort_engine.answer(image, question, max_new_tokens=MAX_NEW)
    finally:
        torch_engine.stop_token_ids, ort_engine.stop_token_ids = saved_t, saved_o
    assert b.token_ids == a.token_ids == free[: free.index(stop)]


# ------------------------------------------------------------------------------ Engine contract
def test_streaming_timings_and_cancel(engines):
    _, engine = engines
    image, question = bench_style_inputs(1)[0]
    seen = []
    r = engine.answer(image, question, max_new_tokens=6, on_token=lambda text, n: seen.append((text, n)))
    assert [n for _, n in seen] == list(range(1, r.num_tokens + 1))
    assert seen[-1][0] == r.text.rstrip("\ufffd").strip()  # streaming hides a half-decoded character
    assert r.vision_ms > 0 and r.prefill_ms > 0 and r.decode_ms >= 0
    assert r.total_ms >= r.vision_ms + r.prefill_ms + r.decode_ms

    r = engine.answer(image, question, max_new_tokens=8, on_token=lambda text, n: n < 2)
    assert r.cancelled and r.num_tokens == 2
    cancel = threading.Event()
    cancel.set()
    r = engine.answer(image, question, max_new_tokens=8, cancel=cancel)
    assert r.cancelled and r.num_tokens == 0 and r.vision_ms == 0


def test_errors(tiny_qwen2vl_dir, tmp_path):
    engine = OnnxRuntimeEngine(export_once(tiny_qwen2vl_dir), num_threads=1)
    image = np.zeros((40, 40, 3), np.uint8)
    for bad in ["", "   "]:
        with pytest.raises(EngineError, match="empty"):
            engine.answer(image, bad)
    with pytest.raises(EngineError, match="uint8"):
        engine.answer(image.astype(np.float32), "q?")
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.answer(image, "q?", max_new_tokens=0)
    assert engine.answer(np.zeros((40, 40), np.uint8), "grey?", max_new_tokens=2).num_tokens <= 2
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.answer(image, "q?")
    with pytest.raises(ModelLoadError, match="vlsi export"):
        OnnxRuntimeEngine(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(export_once(tiny_qwen2vl_dir), broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(ModelLoadError, match="decoder.onnx"):
        OnnxRuntimeEngine(broken)


def test_runtime_never_imports_torch(tiny_qwen2vl_dir):
    export_dir = export_once(tiny_qwen2vl_dir)
    code = (
        "import sys, json, numpy as np\n"
        "from vlsi_model.engine import load_engine\n"
        f"e = load_engine({str(export_dir)!r}, backend='onnxruntime', num_threads=1)\n"
        "r = e.answer(np.full((60, 80, 3), 90, np.uint8), 'How many objects are there?', max_new_tokens=3)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers_models': any("
        "m.startswith('transformers.models.qwen2') for m in sys.modules), 'n': r.num_tokens}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "transformers_models": False, "n": result["n"]} and result["n"] >= 1
    # and registering the backends imports neither onnxruntime, tensorrt nor torch
    code = ("import sys, vlsi_model.engine\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ backend selection
def test_load_engine_picks_onnxruntime_when_an_export_exists(tiny_qwen2vl_dir, tmp_path):
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_qwen2vl_dir, model_copy)
    assert available_backends(model_copy) == ["torch"]
    shutil.copytree(export_once(tiny_qwen2vl_dir), model_copy / "onnx")
    assert available_backends(model_copy) == ["onnxruntime", "torch"]
    engine = load_engine(model_copy)  # auto
    assert engine.backend == "onnxruntime"
    engine.close()
    # explicit backend + engine_dir anywhere
    engine = load_engine(tiny_qwen2vl_dir, backend="onnxruntime", engine_dir=model_copy / "onnx", num_threads=1)
    assert engine.backend == "onnxruntime" and engine.answer(np.zeros((30, 30, 3), np.uint8), "q?", 2).num_tokens
    engine.close()
    with pytest.raises(ModelLoadError, match="vlsi export"):
        load_engine(tiny_qwen2vl_dir, backend="onnxruntime")
    with pytest.raises(ValueError, match="dtype"):
        load_engine(model_copy, backend="onnxruntime", dtype="fp16")
