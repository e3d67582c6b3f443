"""TorchEngine: token-for-token parity with HF generate, streaming, cancel, timings, errors;
the traced decode step (bit-identical to the untraced one, fallbacks), load_engine's registry,
the default (placeholder) model and `vlsi ask`."""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path

import generation_helpers
import numpy as np
import pytest
import torch
from PIL import Image

from vlsi_model import defaults
from vlsi_model.checkpoint import load_model_dir
from vlsi_model.cli import main as cli_main
from vlsi_model.engine import backend_names, load_engine, torch_engine
from vlsi_model.engine.base import EngineError, ModelLoadError
from vlsi_model.engine.torch_engine import DecoderStep, TorchEngine, trace_decoder_step

QUESTIONS = [
    "What colour is the circle?",
    "How many objects are there?",
    "Is there a large blue star left of the small red square?",
    "x",
]
MAX_NEW = 12


def rand_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(24, 200, size=2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["tiny_qwen2vl_dir", "tiny_qwen25vl_dir"])
def loaded(request):
    model, tok, proc = load_model_dir(request.getfixturevalue(request.param))
    return model, tok, proc


def hf_greedy(model, tok, proc, image, question, max_new_tokens=MAX_NEW):
    return generation_helpers.hf_greedy(model, tok, proc, image, question, max_new_tokens)


def strip_stop(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i], True
    return tokens, False


# ------------------------------------------------------------------------ parity
def test_parity_with_generate_without_eos(loaded):
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    for i, q in enumerate(QUESTIONS):
        img = rand_image(i)
        expected, hit = strip_stop(hf_greedy(model, tok, proc, img, q), engine.stop_token_ids)
        result = engine.answer(img, q, max_new_tokens=MAX_NEW)
        assert result.token_ids == expected, f"question {i}"
        assert not result.cancelled
        assert result.text == tok.decode(expected, skip_special_tokens=True).strip()
        if not hit:
            assert result.num_tokens == MAX_NEW


def test_parity_with_generate_when_eos_is_hit(loaded):
    """Make a token the model really produces mid-answer a stop token: both must stop there."""
    model, tok, proc = loaded
    img, q = rand_image(10), QUESTIONS[0]
    free = hf_greedy(model, tok, proc, img, q)
    stop = free[3]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [stop, tok.convert_tokens_to_ids("<|im_end|>")]
    try:
        engine = TorchEngine(model, tok, proc)
        assert stop in engine.stop_token_ids
        hits = 0
        for i, question in enumerate(QUESTIONS):
            image = img if i == 0 else rand_image(20 + i)
            generated = hf_greedy(model, tok, proc, image, question)
            expected, hit = strip_stop(generated, engine.stop_token_ids)
            hits += hit
            if hit:  # generate stops right after the stop token
                assert len(generated) == len(expected) + 1
            result = engine.answer(image, question, max_new_tokens=MAX_NEW)
            assert result.token_ids == expected, f"question {i}"
        assert hits >= 1
    finally:
        model.generation_config.eos_token_id = original


def test_answers_depend_on_the_image(loaded):
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    answers = {tuple(engine.answer(rand_image(50 + i), QUESTIONS[1], max_new_tokens=6).token_ids) for i in range(4)}
    assert len(answers) > 1


def test_max_new_tokens_bounds_the_answer(loaded):
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    img = rand_image(3)
    long = engine.answer(img, QUESTIONS[1], max_new_tokens=MAX_NEW)
    short = engine.answer(img, QUESTIONS[1], max_new_tokens=3)
    assert short.token_ids == long.token_ids[:3]
    assert engine.answer(img, QUESTIONS[1], max_new_tokens=1).num_tokens <= 1
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.answer(img, QUESTIONS[1], max_new_tokens=0)


# ------------------------------------------------------------------------ traced decode step
def test_decode_is_traced_and_untraced_gives_the_same_tokens(loaded):
    model, tok, proc = loaded
    traced = TorchEngine(model, tok, proc)
    plain = TorchEngine(model, tok, proc, trace_decoder=False)
    assert traced.decode_mode == "pending"
    for i, q in enumerate(QUESTIONS):
        img = rand_image(60 + i)
        a = traced.answer(img, q, max_new_tokens=MAX_NEW)
        b = plain.answer(img, q, max_new_tokens=MAX_NEW)
        assert a.token_ids == b.token_ids, f"question {i}"
    assert traced.decode_mode == "traced" and plain.decode_mode == "untraced"


def test_traced_step_is_bit_identical_across_cache_lengths(loaded):
    """One trace serves every cache length: same logits-argmax and the same KV tensors, bit for bit."""
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    engine.warmup()
    assert engine.decode_mode == "traced"
    with torch.inference_mode():
        for past_len in (1, 2, 31, 64, 257):
            inputs = engine._example_step(past_len)
            with torch.jit.optimized_execution(False):
                got = engine._decode_fn(*inputs)
            want = engine._step(*inputs)
            assert len(got) == len(want) == 1 + 2 * model.config.get_text_config().num_hidden_layers
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), past_len
            assert got[1].shape[2] == past_len + 1


def test_trace_failure_falls_back_to_the_untraced_step(loaded, monkeypatch, caplog):
    model, tok, proc = loaded
    img = rand_image(70)
    expected = TorchEngine(model, tok, proc, trace_decoder=False).answer(img, QUESTIONS[0], MAX_NEW).token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(torch_engine, "trace_decoder_step", broken)
    engine = TorchEngine(model, tok, proc)
    with caplog.at_level(logging.WARNING, logger="vlsi_model.engine.torch_engine"):
        result = engine.answer(img, QUESTIONS[0], max_new_tokens=MAX_NEW)
    assert engine.decode_mode == "untraced" and result.token_ids == expected
    assert any("not traced" in r.getMessage() and "no tracing here" in r.getMessage() for r in caplog.records)


def test_traces_per_process_are_bounded_and_later_engines_decode_untraced(loaded, monkeypatch):
    """TorchScript never frees part of each trace, so a process that keeps reloading its model (a
    node's configure / cleanup cycles) stops tracing after the budget: same tokens, untraced."""
    model, tok, proc = loaded
    monkeypatch.setattr(torch_engine, "MAX_TRACED_ENGINES_PER_PROCESS", 1)
    monkeypatch.setattr(torch_engine, "_traced_engines", 0)
    img = rand_image(71)
    first, second = TorchEngine(model, tok, proc), TorchEngine(model, tok, proc)
    a = first.answer(img, QUESTIONS[0], max_new_tokens=MAX_NEW)
    b = second.answer(img, QUESTIONS[0], max_new_tokens=MAX_NEW)
    assert (first.decode_mode, second.decode_mode) == ("traced", "untraced")
    assert a.token_ids == b.token_ids


def test_trace_check_rejects_a_trace_that_baked_in_the_cache_length():
    """trace_decoder_step's check catches a graph that is only right at the traced length."""

    class LengthDependent(torch.nn.Module):
        def forward(self, embeds, pos, *past):
            n = int(past[0].shape[2])  # a Python int: frozen into the trace
            return (embeds.sum().reshape(1) * n, *past)

    def example(n):
        return [torch.ones(1, 1, 4), torch.zeros(3, 1, 1, dtype=torch.long), torch.ones(1, 1, n, 2)]

    with torch.inference_mode(), pytest.raises(RuntimeError, match="cache length 9"):
        trace_decoder_step(LengthDependent(), example(5), example(9))


def test_models_the_fast_path_cannot_reproduce_use_the_hf_forward(loaded):
    """Eager attention needs Hugging Face's explicit masks: the engine decodes through the HF
    forward there, still token for token like generate."""
    model, tok, proc = loaded
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert torch_engine.fast_path_unsupported(eager) is not None
    assert torch_engine.fast_path_unsupported(model) is None
    engine = TorchEngine(eager, tok, proc)
    for i, q in enumerate(QUESTIONS[:2]):
        img = rand_image(80 + i)
        expected, _ = strip_stop(hf_greedy(eager, tok, proc, img, q), engine.stop_token_ids)
        assert engine.answer(img, q, max_new_tokens=MAX_NEW).token_ids == expected
    assert engine.decode_mode == "hf"


def test_decoder_step_shares_the_model_weights(loaded):
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    engine.warmup()
    params = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert {p.data_ptr() for p in DecoderStep(model).parameters()} <= params
    frozen = [n.t("value") for n in engine._decode_fn.graph.nodes()
              if n.kind() == "prim::Constant" and n.output().type().kind() == "TensorType"]
    big = [t for t in frozen if t.numel() > 1]
    assert big and all(t.data_ptr() in params for t in big)  # the trace holds no copy of the weights
    engine.close()
    assert engine._decode_fn is None and engine._step is None and engine.decode_mode == "closed"


# ------------------------------------------------------------------------ streaming / cancel
@pytest.fixture(scope="module")
def engine(tiny_qwen2vl_dir):
    eng = load_engine(tiny_qwen2vl_dir, backend="torch")
    yield eng
    eng.close()


def never_stopping(engine):
    """An (image, question) whose answer runs to max_new_tokens without a stop token."""
    for seed in range(40):
        img = rand_image(100 + seed)
        r = engine.answer(img, QUESTIONS[0], max_new_tokens=8)
        if r.num_tokens == 8:
            return img, r
    pytest.skip("tiny model stops early on every probe image")


def test_streaming_callback_sequence(engine):
    img, reference = never_stopping(engine)
    calls: list[tuple[str, int]] = []
    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, on_token=lambda t, n: calls.append((t, n)))
    assert [n for _, n in calls] == list(range(1, 9))
    assert result.token_ids == reference.token_ids and not result.cancelled
    for text, n in calls:
        expected = engine.tokenizer.decode(result.token_ids[:n], skip_special_tokens=True)
        assert text == expected.rstrip("\ufffd").strip()
    assert calls[-1][0] == result.text.rstrip("\ufffd")


def test_cancel_by_callback_returning_false(engine):
    img, reference = never_stopping(engine)
    seen = []

    def stop_at_three(text, n):
        seen.append(n)
        return n < 3

    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, on_token=stop_at_three)
    assert result.cancelled and seen == [1, 2, 3]
    assert result.token_ids == reference.token_ids[:3]


def test_cancel_by_event(engine):
    img, reference = never_stopping(engine)
    cancel = threading.Event()

    def set_at_two(text, n):
        if n == 2:
            cancel.set()

    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, on_token=set_at_two, cancel=cancel)
    assert result.cancelled and result.token_ids == reference.token_ids[:2]

    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, cancel=cancel)  # already set
    assert result.cancelled and result.token_ids == [] and result.text == ""

    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, cancel=threading.Event())
    assert not result.cancelled and result.token_ids == reference.token_ids


def test_cancel_from_another_thread(engine):
    img, _ = never_stopping(engine)
    cancel = threading.Event()
    started = threading.Event()

    def slow(text, n):
        started.set()
        cancel.wait(5)  # generation blocks here until the other thread cancels

    timer = threading.Thread(target=lambda: (started.wait(5), cancel.set()))
    timer.start()
    result = engine.answer(img, QUESTIONS[0], max_new_tokens=8, on_token=slow, cancel=cancel)
    timer.join()
    assert result.cancelled and result.num_tokens == 1


# ------------------------------------------------------------------------ timings / errors
def test_timings(engine):
    img, _ = never_stopping(engine)
    r = engine.answer(img, QUESTIONS[2], max_new_tokens=8)
    assert r.vision_ms > 0 and r.prefill_ms > 0 and r.decode_ms > 0
    assert r.total_ms >= r.vision_ms + r.prefill_ms + r.decode_ms
    assert r.tokens_per_s > 0


@pytest.mark.parametrize(
    ("image", "question", "message"),
    [
        (np.zeros((10, 10, 3), np.float32), "q?", "uint8"),
        (np.zeros((0, 5, 3), np.uint8), "q?", "empty"),
        (np.zeros((5, 5, 4), np.uint8), "q?", "H x W x 3"),
        (np.zeros((20, 20, 3), np.uint8), "", "empty"),
        (np.zeros((20, 20, 3), np.uint8), "   ", "empty"),
        (np.zeros((20, 20, 3), np.uint8), "why " * 500, "too long"),
    ],
)
def test_bad_requests_raise_and_engine_keeps_working(engine, image, question, message):
    with pytest.raises(EngineError, match=message):
        engine.answer(image, question)
    assert engine.answer(rand_image(1), QUESTIONS[0], max_new_tokens=2).num_tokens <= 2


def test_grey_image_answers_like_rgb(engine):
    grey = rand_image(2)[:, :, 0]
    a = engine.answer(grey, QUESTIONS[0], max_new_tokens=6)
    b = engine.answer(np.stack([grey] * 3, -1), QUESTIONS[0], max_new_tokens=6)
    assert a.token_ids == b.token_ids


def test_close_makes_engine_unusable(tiny_qwen25vl_dir):
    eng = load_engine(tiny_qwen25vl_dir, backend="torch", num_threads=2)
    assert eng.backend == "torch" and eng.model_name == Path(tiny_qwen25vl_dir).name
    assert eng.warmup().num_tokens <= 2
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        eng.answer(rand_image(0), QUESTIONS[0])


# ------------------------------------------------------------------------ load_engine / defaults
def test_load_engine_backends(tiny_qwen2vl_dir):
    assert "torch" in backend_names()
    with pytest.raises(ValueError, match="valid: auto, torch"):
        load_engine(tiny_qwen2vl_dir, backend="tensorflow")
    with pytest.raises(ValueError, match="does not take option.*engine_dir"):
        load_engine(tiny_qwen2vl_dir, backend="torch", engine_dir="/x")
    eng = load_engine(tiny_qwen2vl_dir, backend="auto")
    assert eng.backend == "torch" and not eng.is_placeholder
    eng.close()


def test_load_engine_bad_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_engine(tmp_path / "missing")


def test_default_model_prefers_shipped_student(monkeypatch, tmp_path, tiny_qwen2vl_dir):
    monkeypatch.setattr(defaults, "shipped_student_path", lambda: Path(tiny_qwen2vl_dir))
    assert defaults.default_model_path() == Path(tiny_qwen2vl_dir)
    assert not defaults.default_model_is_placeholder()
    monkeypatch.setattr(defaults, "shipped_student_path", lambda: tmp_path / "not_shipped")
    assert defaults.default_model_is_placeholder()


def test_placeholder_is_built_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("VLSI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "shipped_student_path", lambda: tmp_path / "not_shipped")
    # Two concurrent first uses: both get the same complete directory.
    paths: list[Path] = []
    errors: list[BaseException] = []

    def first_use():
        try:
            paths.append(defaults.default_model_path())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    path = paths[0]
    assert path == tmp_path / "cache" / "models" / defaults.PLACEHOLDER_NAME
    assert sorted(p.name for p in path.parent.iterdir()) == [defaults.PLACEHOLDER_NAME]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert defaults.default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    eng = load_engine(None)
    try:
        assert eng.is_placeholder and eng.model_name == defaults.PLACEHOLDER_NAME
        r = eng.answer(rand_image(5), "How many circles are there?", max_new_tokens=4)
        assert r.vision_ms > 0 and r.prefill_ms > 0
    finally:
        eng.close()


def test_placeholder_build_is_deterministic(tmp_path):
    a = defaults.build_placeholder(tmp_path / "a")
    b = defaults.build_placeholder(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ------------------------------------------------------------------------ vlsi ask
@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "frame.png"
    Image.fromarray(rand_image(7)).save(path)
    return path


def test_cli_ask_json(tiny_qwen2vl_dir, png, capsys):
    rc = cli_main(["ask", "--image", str(png), "--question", QUESTIONS[0], "--model", str(tiny_qwen2vl_dir),
                   "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "torch" and out["num_tokens"] <= 5
    assert out["vision_ms"] > 0 and out["total_ms"] >= out["vision_ms"]
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    eng = load_engine(tiny_qwen2vl_dir)
    assert out["token_ids"] == eng.answer(rgb, QUESTIONS[0], max_new_tokens=5).token_ids
    eng.close()


def test_cli_ask_plain_and_stream(tiny_qwen2vl_dir, png, capsys):
    args = ["ask", "--image", str(png), "--question", QUESTIONS[1], "--model", str(tiny_qwen2vl_dir),
            "--max-new-tokens", "6"]
    assert cli_main(args) == 0
    plain = capsys.readouterr()
    assert "vision" in plain.err and "prefill" in plain.err and "decode" in plain.err
    assert cli_main([*args, "--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.strip() == plain.out.strip()


@pytest.mark.parametrize("content", [None, b"", b"not an image at all"])
def test_cli_ask_bad_image_file(tiny_qwen2vl_dir, tmp_path, capsys, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    rc = cli_main(["ask", "--image", str(path), "--question", "q?", "--model", str(tiny_qwen2vl_dir)])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_cli_ask_bad_model_and_question(tmp_path, png, tiny_qwen2vl_dir, capsys):
    assert cli_main(["ask", "--image", str(png), "--question", "q?", "--model", str(tmp_path / "nope")]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli_main(["ask", "--image", str(png), "--question", "  ", "--model", str(tiny_qwen2vl_dir)]) == 1
    assert "question is empty" in capsys.readouterr().err


def test_answer_many_shares_the_image_and_prefix_and_answers_like_answer(loaded):
    """Several questions about one frame: one vision pass and one shared prefix prefill, the same
    tokens as answering each alone (identical and differing question prefixes, cancels, limits)."""
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    img = rand_image(80)
    questions = [*QUESTIONS, "How many objects are there?", "How many red circles are there?"]
    limits = [MAX_NEW, MAX_NEW, 3, MAX_NEW, MAX_NEW, 5][: len(questions)]
    alone = [engine.answer(img, q, max_new_tokens=n) for q, n in zip(questions, limits, strict=True)]
    calls = []
    vision = engine._vision
    engine._vision = lambda *a: (calls.append(1), vision(*a))[1]
    together = engine.answer_many(img, questions, limits)
    assert len(calls) == 1
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert together[0].vision_ms > 0 and all(r.vision_ms == 0 for r in together[1:])
    stop = threading.Event()
    stop.set()
    cancelled = engine.answer_many(img, questions[:2], MAX_NEW, cancels=[None, stop])
    assert cancelled[1].cancelled and cancelled[0].token_ids == alone[0].token_ids


def test_answer_batch_decodes_different_frames_together_like_answer(loaded):
    """Questions about different frames (prompts of different lengths, different limits) decode in
    one batch with the same tokens as answering each alone; a bad question gets its error in its
    place and a cancelled one is cancelled, without stopping the others."""
    model, tok, proc = loaded
    engine = TorchEngine(model, tok, proc)
    images = [rand_image(81), rand_image(82)[:60], rand_image(83), rand_image(84)[:, :70]]
    questions = [*QUESTIONS, "How many objects are there?", "How many red circles are there in this picture?"][:4]
    limits = [MAX_NEW, 3, MAX_NEW, 5]
    alone = [engine.answer(i, q, max_new_tokens=n) for i, q, n in zip(images, questions, limits, strict=True)]
    delivered = []  # (index, tokens, text) as each answer left the batch
    together = engine.answer_batch(images, questions, limits,
                                   on_answer=lambda k, r: delivered.append((k, list(r.token_ids), r.text)))
    assert engine._batch_fn is not None
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    # every answer delivered once, complete, the shorter ones first (they left the batch earlier)
    assert sorted(delivered) == sorted((k, r.token_ids, r.text) for k, r in enumerate(together))
    assert [len(tokens) for _, tokens, _ in delivered] == sorted(len(r.token_ids) for r in together)
    assert [r.text for r in together] == [r.text for r in alone]
    assert engine.supports_batch
    decoded = [r for r in together if len(r.token_ids) > 1]
    assert all(0 < r.decode_ms < r.total_ms for r in decoded)  # decode: until it left the batch
    assert all(r.total_ms >= r.vision_ms + r.prefill_ms for r in together)
    stop = threading.Event()
    stop.set()
    mixed = engine.answer_batch(images[:3], [questions[0], "  ", questions[2]], MAX_NEW, cancels=[None, None, stop])
    assert isinstance(mixed[1], EngineError) and mixed[2].cancelled
    assert mixed[0].token_ids == alone[0].token_ids
