"""Answers with many valid forms (the study's R-open data) and the content scoring that sees
through them: every form the generator writes scores as its original, wrong content never does,
and `vlsi data scenes --open-forms` / `vlsi eval --open-forms` carry both ends."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from vlsi_model import cli
from vlsi_model.data import question_families, scene_dataset, scenes
from vlsi_model.data.open_answers import (
    SYNONYMS,
    canonical,
    canonical_match,
    choice_entropy,
    named_items,
    open_form,
    open_records,
    score_content,
    set_f1,
)
from vlsi_model.evaluation import EvalSample, format_table, score


def _scene_answers(n_scenes: int = 150) -> list[question_families.QA]:
    config = scenes.SceneConfig(shapes=scenes.ALL_SHAPES, min_objects=0, max_objects=6)
    out = []
    for i in range(n_scenes):
        out += question_families.make_questions(scenes.generate_scene(i, config), i)
    return out


def test_every_form_of_every_family_scores_as_the_original() -> None:
    qas = _scene_answers()
    assert {qa.family for qa in qas} == set(question_families.FAMILIES)
    for i, qa in enumerate(qas):
        for k in range(3):
            form = open_form(qa.answer, qa.family, random.Random(f"{k}:{i}"))
            assert canonical_match(form, qa.answer), (qa.family, qa.answer, form)
            assert set_f1(form, qa.answer) == 1.0


def test_forms_vary_in_words_order_and_numbers() -> None:
    caption = "red circle blue square green triangle"
    forms = {open_form(caption, "caption", random.Random(k)) for k in range(40)}
    assert len(forms) > 20
    assert any(f.split()[0] not in ("red", "crimson", "scarlet") for f in forms)  # order shuffled
    assert any(" and " in f and "," in f for f in forms)
    assert {open_form("3", "count", random.Random(k)) for k in range(20)} == {"3", "three"}
    assert {open_form("large", "attribute", random.Random(k)) for k in range(30)} == {"large", "big", "huge"}
    assert {open_form("yes", "exist", random.Random(k)) for k in range(5)} == {"yes"}


def test_every_default_scene_word_has_synonyms() -> None:
    for word in scenes.COLORS + scenes.SHAPES + scenes.SIZES:
        assert len(SYNONYMS[word]) >= 2 and SYNONYMS[word][0] == word


@pytest.mark.parametrize(("prediction", "reference"), [
    ("red circle, blue square", "red circle, blue triangle"),
    ("red circle", "red circle, blue square"),
    ("two", "3"),
    ("crimson disc top left", "red circle top right"),
    ("small", "large"),
    ("", "red circle"),
])  # fmt: skip
def test_wrong_content_never_matches(prediction: str, reference: str) -> None:
    assert not canonical_match(prediction, reference)
    assert set_f1(prediction, reference) < 1.0 or not named_items(reference)


def test_set_f1_gives_partial_credit_for_lists() -> None:
    reference = "red circle, blue square, green triangle, yellow circle, purple square"
    one_wrong = "Scarlet disc, navy box, lime wedge, amber dot and lilac wedge"
    assert set_f1(one_wrong, reference) == pytest.approx(0.8)
    assert set_f1("red circle red circle", "red circle") == pytest.approx(2 / 3)  # a duplicate is not free
    assert canonical("Red circle and blue square.") == canonical("blue square, red circle") == "blue square, red circle"
    assert canonical("three BOXES") == "3 squares"


def test_open_records_are_seeded_and_keep_the_original() -> None:
    records = [{"id": str(i), "image": "x.png", "family": "caption",
                "conversations": [{"from": "human", "value": "<image>\nWhat objects are there?"},
                                  {"from": "gpt", "value": "red circle blue square green triangle"}]}
               for i in range(20)]  # fmt: skip
    first, again, other = open_records(records, 0), open_records(records, 0), open_records(records, 1)
    assert first == again and first != other
    assert records[0]["conversations"][1]["value"] == "red circle blue square green triangle"  # input untouched
    assert len({r["conversations"][1]["value"] for r in first}) > 10
    assert all(r["canonical_answer"] == "red circle blue square green triangle" for r in first)


def test_content_scores_see_through_forms_where_exact_match_does_not() -> None:
    samples = [EvalSample(0, "a", Path("x.png"), "q?", "red circle blue square", "caption"),
               EvalSample(1, "b", Path("x.png"), "q?", "3", "count"),
               EvalSample(2, "c", Path("x.png"), "q?", "yes", "exist"),
               EvalSample(3, "d", Path("x.png"), "q?", "red circle top left, blue square top right", "positions")]
    predictions = ["navy box and red disc", "three", "no", "red circle top left and blue square bottom right"]
    result = score(samples, predictions, open_forms=True)
    assert result["overall"]["accuracy"] == 0.25  # only "three" == "3" after normalisation
    content = result["content"]
    assert content["accuracy"] == 0.5 and content["correct"] == 2 and content["n"] == 4
    assert content["families"] == {"caption": 1.0, "count": 1.0, "exist": 0.0, "positions": 0.0}
    assert content["list_set_f1"] == pytest.approx((1.0 + 0.5) / 2) and content["list_n"] == 2
    assert [row["content_match"] for row in result["predictions"]] == [True, True, False, False]
    assert "Content match" in format_table(result) and "0.500" in format_table(result)
    assert "content" not in score(samples, predictions)


def test_score_content_of_no_rows() -> None:
    assert score_content([]) == {"accuracy": 0.0, "n": 0, "correct": 0, "families": {}, "family_details": {},
                                 "question_types": {}, "list_set_f1": None, "list_n": 0}


def test_priors_and_constant_answers_are_counted_on_content() -> None:
    """A model that always says "red" in one of three words is a constant answer, and the prior of
    a family whose references say "red" in three words is the share of red, not a third of it."""
    question = "What color is the circle?"
    refs = ["red", "crimson", "scarlet", "blue"]
    preds = ["scarlet", "red", "crimson", "red"]
    rows = [{"family": "attribute", "question": question, "reference": r, "prediction": p}
            for r, p in zip(refs, preds, strict=True)]
    content = score_content(rows)
    attribute = content["family_details"]["attribute"]
    assert (attribute["prior"], attribute["majority_answer"], attribute["accuracy"]) == (0.75, "red", 0.75)
    (template,) = content["question_types"].values()
    assert template["top_predictions"] == [["red", 4]]  # constant: every answer says red


def test_order_counts_only_where_it_is_content_and_articles_never() -> None:
    left_to_right = "There are three objects: a small red circle, a large blue square and a small green triangle."
    swapped = "There are three objects: a small red circle, a small green triangle and a large blue square."
    assert not canonical_match(left_to_right, swapped, "describe")
    assert canonical_match("tiny crimson disc, huge azure box", "blue square and red circle", "caption") is False
    assert canonical_match("a red circle a blue square", "blue square, red circle", "caption")
    assert canonical_match("the red circle and a blue square", "red circle blue square")


def test_cli_writes_open_forms_that_score_fully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("data",))
    out = tmp_path / "open"
    args = ["data", "scenes", "--out", str(out), "--num", "12", "--split", "val", "--size", "64",
            "--families", "caption,count,positions", "--open-forms"]  # fmt: skip
    assert cli.main(args) == 0
    records = json.loads((out / "val.json").read_text())
    answers = [r["conversations"][1]["value"] for r in records]
    originals = [r["canonical_answer"] for r in records]
    assert answers != originals
    assert all(canonical_match(a, o) for a, o in zip(answers, originals, strict=True))
    plain = tmp_path / "plain"
    assert cli.main([*args[:3], str(plain), *args[4:-1]]) == 0
    assert [r["conversations"][1]["value"] for r in json.loads((plain / "val.json").read_text())] == originals
    assert cli.main(args) == 0  # same seed and split: the same forms
    assert [r["conversations"][1]["value"] for r in json.loads((out / "val.json").read_text())] == answers


def test_cli_rewrites_any_dataset_and_keeps_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("data",))
    scene_dataset.write_dataset(tmp_path / "src", 6, 0, families=("caption", "count"))
    src = tmp_path / "src" / "train.json"
    out = tmp_path / "elsewhere" / "open.json"
    assert cli.main(["data", "open-forms", str(src), "--out", str(out), "--seed", "3"]) == 0
    plain, rewritten = json.loads(src.read_text()), json.loads(out.read_text())
    assert len(rewritten) == len(plain)
    for before, after in zip(plain, rewritten, strict=True):
        assert (out.parent / after["image"]).resolve() == (src.parent / before["image"]).resolve()
        assert (out.parent / after["image"]).is_file()
        assert after["canonical_answer"] == before["conversations"][1]["value"]
        assert canonical_match(after["conversations"][1]["value"], before["conversations"][1]["value"])
    assert cli.main(["data", "open-forms", str(src), "--out", str(src)]) == 2
    assert cli.main(["data", "open-forms", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_choice_entropy_bounds_the_forms_entropy() -> None:
    assert choice_entropy("large", "attribute") == pytest.approx(math.log(3))
    assert choice_entropy("3", "count") == pytest.approx(math.log(2))
    assert choice_entropy("yes", "exist") == 0.0
    caption = "red circle blue square"
    assert choice_entropy(caption, "caption") == pytest.approx(math.log(2) + 4 * math.log(3))
    assert choice_entropy("red circle top left, blue square middle right", "positions") == pytest.approx(
        choice_entropy(caption, "caption"))
    # the empirical entropy of the forms never exceeds it (here: every (order, synonym) choice is distinct)
    forms = [open_form(caption, "caption", random.Random(k)) for k in range(20000)]
    counts = Counter(forms)
    empirical = -sum(c / len(forms) * math.log(c / len(forms)) for c in counts.values())
    assert empirical <= choice_entropy(caption, "caption") + 1e-9
    assert empirical > 0.9 * choice_entropy(caption, "caption")
