"""run_state: a finished run is reused only for the config that trained it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlsi_model.recipes.run_state import StaleRunError, config_differences, run_state

DISTILL = {"output_dir": "runs/x", "teacher": {"path": "t"}, "train": {"lr": 1e-4, "save_every_steps": 100},
           "steps": {"sft": {"max_steps": 400}}, "targets": [1, 2]}


def _finished_run(tmp_path: Path, saved: dict | None, name: str = "distill_config.yaml") -> Path:
    (tmp_path / "final").mkdir(parents=True)
    (tmp_path / "final" / "config.json").write_text("{}")
    if saved is not None:
        (tmp_path / name).write_text(yaml.safe_dump(saved))
    return tmp_path


def test_no_final_model_is_todo_even_with_a_saved_config(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(DISTILL))
    assert run_state(tmp_path, {**DISTILL, "train": {"lr": 1.0}}) == "todo"  # the trainer judges a resume


def test_same_config_is_done_whatever_its_bookkeeping(tmp_path):
    run = _finished_run(tmp_path, DISTILL)
    assert run_state(run, DISTILL) == "done"
    assert run_state(run, {**DISTILL, "train": {"lr": 1e-4, "save_every_steps": 5}}) == "done"
    assert run_state(run, {**DISTILL, "output_dir": "runs/moved"}) == "done"  # a moved run is still that run


def test_any_other_setting_is_refused_naming_it(tmp_path):
    run = _finished_run(tmp_path, DISTILL)
    edited = {**DISTILL, "steps": {"sft": {"max_steps": 800}}, "targets": [1, 3], "new_key": True}
    with pytest.raises(StaleRunError) as err:
        run_state(run, edited)
    text = str(err.value)
    assert "steps.sft.max_steps: 400 -> 800" in text and "targets: [1, 2] -> [1, 3]" in text
    assert "new_key: (unset) -> True" in text and "nothing was changed" in text
    assert (run / "final" / "config.json").is_file()


def test_a_final_model_without_its_config_is_refused(tmp_path):
    with pytest.raises(StaleRunError, match="cannot tell which config"):
        run_state(_finished_run(tmp_path, None), DISTILL)


def test_differences_compare_tuples_and_lists_alike():
    assert config_differences({"b": (0.9, 0.98)}, {"b": [0.9, 0.98]}) == []
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: (unset) -> 2"]
