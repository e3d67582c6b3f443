"""`vlsi eval` / vlsi_model.evaluation: exact match per family, JSON output, data without families,
and a model whose answers are known (the "yes" model) scoring exactly where it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlsi_model.cli import main
from vlsi_model.data.scene_dataset import write_dataset
from vlsi_model.data.scenes import SceneConfig
from vlsi_model.evaluation import NO_FAMILY, EvalSample, evaluate, format_table, load_eval_samples, score


def _sample(i: int, reference: str, family: str = "count") -> EvalSample:
    return EvalSample(i, f"r{i}", Path("x.png"), "q?", reference, family)


def test_score_per_family_with_normalisation():
    samples = [_sample(0, "2"), _sample(1, "3"), _sample(2, "yes", "exist"), _sample(3, "no", "exist"),
               _sample(4, "red", "attribute")]
    preds = ["Two.", "4", "yes", "yes", "The red"]
    r = score(samples, preds)
    assert r["families"]["count"] == {"accuracy": 0.5, "n": 2, "correct": 1, "prior": 0.5, "majority_answer": "2",
                                      "top_predictions": [["2", 1], ["4", 1]]}
    assert r["families"]["exist"]["accuracy"] == 0.5 and r["families"]["exist"]["n"] == 2
    assert r["families"]["attribute"]["accuracy"] == 1.0  # "The red" -> "red"
    assert r["overall"] == {"accuracy": 3 / 5, "n": 5, "correct": 3}
    assert [row["correct"] for row in r["predictions"]] == [True, False, True, False, True]
    assert "| **overall** | 5 |" in format_table(r)
    with pytest.raises(ValueError):
        score(samples, preds[:-1])


def test_positions_answers_are_also_scored_per_object():
    refs = ["red circle top left, blue square middle right", "green triangle middle right",
            "red circle top left, red circle bottom center"]
    preds = ["Red circle top left, blue square top right.",  # one of two objects placed right
             "green triangle middle right",  # exact
             "red circle bottom center, red circle top left, yellow star middle center"]  # both, order free
    samples = [_sample(i, ref, "positions") for i, ref in enumerate(refs)] + [_sample(3, "2")]
    r = score(samples, [*preds, "2"])
    assert r["families"]["positions"]["accuracy"] == 1 / 3  # exact match: only the single-object answer
    assert r["object_regions"] == {"accuracy": 4 / 5, "objects": 5, "correct": 4, "prior": 0.4,
                                   "majority_region": "top left"}
    assert "right region in the positions answers: **0.800** of 5 (prior 0.400" in format_table(r)
    garbled = score(samples[:1], ["red circle top, blue square"])  # malformed items name nothing
    assert garbled["object_regions"]["correct"] == 0
    assert "object_regions" not in score(samples[3:], ["2"])  # no positions questions, no such score


def test_question_types_expose_a_constant_answer():
    """A model that answers "circle" to every shape question: the family looks fine, the template does not."""
    from vlsi_model.evaluation import format_question_type_table

    questions = [("What shape is the red object?", "circle", "circle"), ("What shape is the blue object?", "square",
                 "circle"), ("What color is the square?", "blue", "blue"), ("What color is the circle?", "red", "red"),
                 ("How many red objects are there?", "1", "1"), ("Is the red circle left of the blue square?", "yes",
                 "yes"), ("Is the red circle above the blue square?", "no", "yes"), ("what else?", "x", "x")]
    samples = [EvalSample(i, f"r{i}", Path("x.png"), q, ref, "f") for i, (q, ref, _) in enumerate(questions)]
    r = score(samples, [pred for _, _, pred in questions])
    types = r["question_types"]
    assert set(types) == {"attribute/shape", "attribute/color", "count/color", "spatial/left-right",
                          "spatial/above-below"}  # the free-form question has no template
    shape = types["attribute/shape"]
    assert shape["accuracy"] == 0.5 and shape["top_predictions"] == [["circle", 2]]
    assert types["attribute/color"]["accuracy"] == 1.0
    assert "| attribute/shape | 2 | 0.500 | 0.500 (circle) | circle 2 |" in format_question_type_table(r)
    assert format_question_type_table(score(samples[-1:], ["x"])) == ""


def test_question_type_names_every_template_the_generator_writes():
    from vlsi_model.data.question_families import FAMILIES, make_questions, question_type
    from vlsi_model.data.scenes import generate_scene
    kinds = set()
    for seed in range(40):
        for qa in make_questions(generate_scene(seed), seed, families=FAMILIES, per_family=4):
            kind = question_type(qa.question)
            assert kind is not None and kind.split("/")[0] == qa.family, qa
            kinds.add(kind)
    assert {"attribute/color", "attribute/shape", "attribute/size", "count/objects", "count/color", "count/shape",
            "count/shape+color", "exist", "spatial/left-right", "spatial/above-below", "compare", "caption",
            "describe", "locate", "positions"} == kinds


@pytest.fixture(scope="module")
def scenes_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_data")
    return write_dataset(out, 6, seed=0, split="test", config=SceneConfig(width=112, height=112),
                         families=("count", "exist", "spatial", "attribute"))


def test_user_data_without_family_is_all(tmp_path, scenes_json):
    records = json.loads(scenes_json.read_text())[:3]
    for r in records:
        r.pop("family")
        r["image"] = str(scenes_json.parent / r["image"])  # absolute paths work too
    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = load_eval_samples(data)
    assert {s.family for s in samples} == {NO_FAMILY} and len(samples) == 3
    assert load_eval_samples(data, max_samples=2)[-1].index == 1


def test_yes_model_scores_exactly_on_yes_answers(yes_model_dir, scenes_json, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(yes_model_dir), "--data", str(scenes_json), "--out", str(out),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| family |" in table and "overall" in table
    results = json.loads(out.read_text())
    rows = results["predictions"]
    assert len(rows) == results["overall"]["n"] == len(json.loads(scenes_json.read_text()))
    assert all(r["prediction"] == "yes" for r in rows)
    assert all(r["correct"] == (r["reference"] == "yes") for r in rows)
    fams = results["families"]
    assert fams["count"]["accuracy"] == 0.0 and fams["attribute"]["accuracy"] == 0.0
    yes_share = sum(r["reference"] == "yes" for r in rows if r["family"] == "exist") / fams["exist"]["n"]
    assert fams["exist"]["accuracy"] == pytest.approx(yes_share)
    assert sum(f["n"] for f in fams.values()) == results["overall"]["n"]


def test_evaluate_reuses_a_loaded_engine_and_max_samples(yes_model_dir, scenes_json):
    from vlsi_model.engine import load_engine

    engine = load_engine(yes_model_dir, "torch")
    r = evaluate(None, scenes_json, max_samples=4, engine=engine)
    assert r["overall"]["n"] == 4
    assert engine.answer  # still open: evaluate closes only engines it loaded itself
    engine.close()


def test_bad_data_is_a_clean_error(tmp_path, capsys, yes_model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    assert main(["eval", "--model", str(yes_model_dir), "--data", str(bad), "--no-progress"]) == 1
    assert "record 0" in capsys.readouterr().err


def test_open_forms_eval_scores_content(yes_model_dir, scenes_json, tmp_path, capsys):
    out = tmp_path / "open.json"
    assert main(["eval", "--model", str(yes_model_dir), "--data", str(scenes_json), "--out", str(out),
                 "--no-progress", "--open-forms"]) == 0
    assert "Content match" in capsys.readouterr().out
    results = json.loads(out.read_text())
    content = results["content"]
    assert content["n"] == results["overall"]["n"]
    assert content["correct"] == results["overall"]["correct"]  # "yes" has one form: the same answers count
    assert all(r["content_match"] == r["correct"] for r in results["predictions"])
