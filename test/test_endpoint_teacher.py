"""EndpointTeacher against a real OpenAI-compatible server (test/openai_server.py) serving the tiny model.

The server runs the project's torch engine on the tiny random Qwen2-VL, so every answer can be
checked against the local engine and every token probability against `LocalTeacher`; it also
simulates overload (503) so the `openai` client's retries are exercised for real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from openai_server import TeacherServer, image_sha1, serve_teacher

from vlsi_model.data.endpoint_teacher import EndpointError, EndpointTeacher, answer_from_choice
from vlsi_model.data.labelling import LabelRequest, LocalTeacher, label_file

QUESTIONS = ("How many objects are there?", "What colour is the circle?", "Is there a red square?",
             "Describe the image.", "Where is the blue star?", "How many objects are there?")
MAX_NEW_TOKENS = 24  # the random model never stops: every answer is this long


def _images(n: int) -> list[np.ndarray]:
    from vlsi_model.data.render import render_scene
    from vlsi_model.data.scenes import SceneConfig, generate_scene
    return [render_scene(generate_scene(seed, SceneConfig(width=112, height=112))) for seed in range(n)]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return _images(len(QUESTIONS))


@pytest.fixture(scope="module")
def server(tiny_qwen2vl_dir):
    with TeacherServer(tiny_qwen2vl_dir) as srv:
        yield srv


@pytest.fixture
def fresh_server(server):
    server.reset()
    return server


def _teacher(server: TeacherServer, **options) -> EndpointTeacher:
    options = {"max_new_tokens": MAX_NEW_TOKENS, "concurrency": 3, "max_retries": 2, "timeout_s": 30.0, **options}
    return EndpointTeacher(server.base_url, options.pop("model", server.model_name), **options)


def _requests(images: list[np.ndarray]) -> list[LabelRequest]:
    return [LabelRequest(f"r{i}", Path(f"img{i}.png"), QUESTIONS[i]) for i in range(len(images))]


def _write_llava(tmp_path: Path, images: list[np.ndarray], answered: tuple[int, ...] = ()) -> Path:
    from PIL import Image

    records = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
        convs = [{"from": "human", "value": f"<image>\n{QUESTIONS[i]}"}]
        if i in answered:
            convs.append({"from": "gpt", "value": "given answer"})
        records.append({"id": f"r{i}", "image": f"img{i}.png", "conversations": convs})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_answers_match_the_local_engine_and_local_teacher(fresh_server, images, tiny_qwen2vl_dir):
    from vlsi_model.engine import load_engine

    requests = _requests(images[:5])
    with _teacher(fresh_server, top_logprobs=3) as teacher:
        got = teacher.answer_batch(requests, images[:5])
    engine = load_engine(tiny_qwen2vl_dir, backend="torch")
    expected = [engine.answer(im, r.question, max_new_tokens=MAX_NEW_TOKENS).text
                for r, im in zip(requests, images[:5], strict=True)]
    assert [a.answer for a in got] == expected  # request order kept although 3 were in flight
    local = LocalTeacher(tiny_qwen2vl_dir, max_new_tokens=MAX_NEW_TOKENS).answer_batch(requests, images[:5])
    for endpoint_answer, local_answer in zip(got, local, strict=True):
        assert endpoint_answer.answer == local_answer.answer
        assert 0.0 < endpoint_answer.mean_token_prob <= 1.0
        assert endpoint_answer.mean_token_prob == pytest.approx(local_answer.mean_token_prob, abs=1e-4)
        assert endpoint_answer.num_tokens == local_answer.num_tokens == MAX_NEW_TOKENS
    assert fresh_server.requests == 5
    assert [q for q, _ in sorted(fresh_server.answered)] == sorted(r.question for r in requests)


def test_the_server_reports_honest_logprobs(fresh_server, images):
    """The served logprobs are the model's: the greedy token is the top-1 alternative, and the
    top alternatives are sorted and sum to at most probability 1."""
    import openai

    from vlsi_model.data.endpoint_teacher import png_data_url

    client = openai.OpenAI(base_url=fresh_server.base_url, api_key="EMPTY", max_retries=0)
    content = [{"type": "image_url", "image_url": {"url": png_data_url(images[0])}},
               {"type": "text", "text": QUESTIONS[0]}]
    out = client.chat.completions.create(model=fresh_server.model_name, temperature=0, max_tokens=8, logprobs=True,
                                         top_logprobs=5, messages=[{"role": "user", "content": content}])
    entries = out.choices[0].logprobs.content
    assert out.object == "chat.completion" and out.choices[0].finish_reason == "length"
    assert len(entries) == 8 == out.usage.completion_tokens
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert entry.top_logprobs[0].token == entry.token and tops[0] == pytest.approx(entry.logprob)
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1.0 + 1e-5
    assert [m.id for m in client.models.list()] == [fresh_server.model_name]
    client.close()


def test_label_file_end_to_end(fresh_server, images, tmp_path, tiny_qwen2vl_dir):
    from vlsi_model.engine import load_engine

    data = _write_llava(tmp_path, images, answered=(2,))
    with _teacher(fresh_server) as teacher:
        report = label_file(teacher, data, tmp_path / "out.json", batch_size=4, progress=False)
    assert (report.records, report.labelled, report.given, report.resumed) == (6, 5, 1, 0)
    out = json.loads((tmp_path / "out.json").read_text())
    engine = load_engine(tiny_qwen2vl_dir, backend="torch")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(6)]
    for i, record in enumerate(out):
        if i == 2:
            assert record["label"] == {"source": "given"} and record["conversations"][1]["value"] == "given answer"
            continue
        assert record["conversations"][1] == {
            "from": "gpt", "value": engine.answer(images[i], QUESTIONS[i], max_new_tokens=MAX_NEW_TOKENS).text}
        label = record["label"]
        assert label["source"] == "teacher" and label["teacher"] == fresh_server.model_name
        assert 0.0 < label["mean_token_prob"] <= 1.0 and label["num_tokens"] == MAX_NEW_TOKENS
    assert fresh_server.requests == 5
    assert not list(tmp_path.glob("out.json.partial*"))


def test_retries_recover_from_overload(fresh_server, images, tmp_path):
    data = _write_llava(tmp_path, images[:4])
    fresh_server.reset(fail_first=2)  # the first two requests get 503; the client backs off and retries
    with _teacher(fresh_server, max_retries=2) as teacher:
        report = label_file(teacher, data, tmp_path / "out.json", batch_size=4, progress=False)
    assert report.labelled == 4
    assert fresh_server.requests == 4 + 2 and len(fresh_server.answered) == 4
    out = json.loads((tmp_path / "out.json").read_text())
    assert all(r["label"]["source"] == "teacher" for r in out) and len(out) == 4


def test_a_request_that_keeps_failing_names_the_record(fresh_server, images):
    fresh_server.reset(fail_first=100)
    with _teacher(fresh_server, max_retries=1, concurrency=1) as teacher, \
            pytest.raises(EndpointError) as err:
        teacher.answer_batch(_requests(images[:2]), images[:2])
    message = str(err.value)
    assert "'r0'" in message and "HTTP 503" in message and "overloaded" in message and "after 1 retries" in message
    assert err.value.key == "r0" and err.value.status_code == 503
    assert fresh_server.requests == 2  # one try and one retry; r1 was never sent


def test_an_unreachable_server_is_a_clear_error(images):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    teacher = EndpointTeacher(f"http://127.0.0.1:{port}/v1", "m", max_retries=0, timeout_s=5)
    with pytest.raises(EndpointError, match=r"record 'r0' failed after 0 retries: Connection error"):
        teacher.answer_batch(_requests(images[:1]), images[:1])


def test_a_wrong_model_name_is_a_clear_error(fresh_server, images, tmp_path):
    with _teacher(fresh_server, model="Qwen/Qwen2-VL-72B-Instruct") as teacher, pytest.raises(EndpointError) as err:
        teacher.answer_batch(_requests(images[:1]), images[:1])
    message = str(err.value)
    assert "HTTP 404" in message and "does not exist" in message and "'r0'" in message
    assert f"(the server has ['{fresh_server.model_name}'], not 'Qwen/Qwen2-VL-72B-Instruct')" in message
    assert "retries" not in message
    assert err.value.status_code == 404 and fresh_server.requests == 1  # a 404 is not retried

    data = _write_llava(tmp_path, images[:2])
    with _teacher(fresh_server, model="nope") as teacher, pytest.raises(EndpointError, match="does not exist"):
        label_file(teacher, data, tmp_path / "out.json", batch_size=4, progress=False)
    assert not (tmp_path / "out.json").exists()


def test_an_interrupted_run_resumes_without_asking_again(fresh_server, images, tmp_path):
    data, out = _write_llava(tmp_path, images), tmp_path / "out.json"

    def interrupt(labelled: int) -> None:
        raise KeyboardInterrupt  # as a Ctrl-C / kill after the first batch was written

    with _teacher(fresh_server) as teacher:
        with pytest.raises(KeyboardInterrupt):
            label_file(teacher, data, out, batch_size=4, progress=False, on_batch=interrupt)
        assert fresh_server.requests == 4 and not out.exists()
        assert len(list(tmp_path.glob("out.json.partial*.jsonl"))) == 1
        first_run = {sha for _, sha in fresh_server.answered}
        fresh_server.reset()
        report = label_file(teacher, data, out, batch_size=4, progress=False)
    assert (report.resumed, report.labelled) == (4, 2)
    # Only the two records the first run did not reach were asked.
    assert fresh_server.requests == 2
    assert {sha for _, sha in fresh_server.answered} == {image_sha1(im) for im in images} - first_run
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == [f"r{i}" for i in range(6)]
    assert all(r["label"]["source"] == "teacher" and len(r["conversations"]) == 2 for r in records)


def test_stop_tokens_are_not_counted_as_answer_tokens(yes_model_dir, images):
    """A model that stops ("yes"): whether the server reports the stop token (vLLM) or not, the
    probabilities are the answer's, as LocalTeacher's."""
    requests = _requests(images[:3])
    local = LocalTeacher(yes_model_dir, max_new_tokens=8).answer_batch(requests, images[:3])
    assert {a.answer for a in local} == {"yes"}
    for report_stop_token in (True, False):
        with TeacherServer(yes_model_dir, report_stop_token=report_stop_token) as srv, \
                _teacher(srv, max_new_tokens=8) as teacher:
            got = teacher.answer_batch(requests, images[:3])
        for endpoint_answer, local_answer in zip(got, local, strict=True):
            assert endpoint_answer.answer == "yes"
            assert endpoint_answer.num_tokens == local_answer.num_tokens
            assert endpoint_answer.mean_token_prob == pytest.approx(local_answer.mean_token_prob, abs=1e-4)


def test_answer_from_choice_rules():
    def choice(content, tokens, finish="stop"):
        entries = None if tokens is None else [SimpleNamespace(token=t, logprob=lp) for t, lp in tokens]
        return SimpleNamespace(message=SimpleNamespace(content=content), finish_reason=finish,
                               logprobs=None if entries is None else SimpleNamespace(content=entries))

    ln = math.log
    a = answer_from_choice(choice(" two ", [("two", ln(0.8)), ("<|im_end|>", ln(0.2))]))
    assert (a.answer, a.num_tokens) == ("two", 1) and a.mean_token_prob == pytest.approx(0.8)
    a = answer_from_choice(choice("two", [("t", ln(0.5)), ("wo", ln(1.0))]))
    assert a.num_tokens == 2 and a.mean_token_prob == pytest.approx(0.75)
    a = answer_from_choice(choice("", [("<|im_end|>", ln(0.4))]))  # empty answer: the stop token's probability
    assert (a.answer, a.num_tokens) == ("", 0) and a.mean_token_prob == pytest.approx(0.4)
    a = answer_from_choice(choice("x", [("x", ln(0.5)), ("<|im_end|>", ln(0.1))], finish="length"))
    assert a.num_tokens == 2 and a.truncated  # cut by max_tokens: nothing is a stop token
    assert not answer_from_choice(choice("two", [("two", ln(0.8)), ("<|im_end|>", ln(0.2))])).truncated
    assert answer_from_choice(choice("tw", None, finish="length"), usage=SimpleNamespace(completion_tokens=1)).truncated
    a = answer_from_choice(choice("two", None), usage=SimpleNamespace(completion_tokens=2))
    assert (a.answer, a.mean_token_prob, a.num_tokens) == ("two", None, 2)
    assert answer_from_choice(SimpleNamespace(message=SimpleNamespace(content=None), logprobs=None)).num_tokens == 0


def test_serve_teacher_and_argument_checks(tiny_qwen2vl_dir):
    base_url, stop = serve_teacher(tiny_qwen2vl_dir)
    try:
        with EndpointTeacher(base_url, "model") as teacher:
            assert teacher.served_models() == ["model"] and teacher.name == "model"
    finally:
        stop()
    for bad in ({"concurrency": 0}, {"max_new_tokens": 0}, {"top_logprobs": 21}, {"max_retries": -1},
                {"timeout_s": 0}):
        with pytest.raises(ValueError):
            EndpointTeacher(base_url, "model", **bad)
    with pytest.raises(ValueError, match="2 requests but 1 images"):
        EndpointTeacher(base_url, "model").answer_batch(_requests(_images(2)), _images(1))
