"""run_state: a finished run is reused only for the config that trained it."""

from __future__ import annotations

import os
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


def test_an_input_changed_after_the_run_makes_it_stale(tmp_path):
    run = _finished_run(tmp_path / "run", DISTILL)
    start_model, data = tmp_path / "start", tmp_path / "train.json"
    start_model.mkdir()
    (start_model / "model.safetensors").write_text("x")
    data.write_text("[]")
    trained = (run / "final" / "config.json").stat().st_mtime
    for path in (start_model / "model.safetensors", data):
        os.utime(path, (trained - 60, trained - 60))
    assert run_state(run, DISTILL, inputs=[start_model, data, tmp_path / "absent.json"]) == "done"
    os.utime(start_model / "model.safetensors", (trained + 60, trained + 60))  # an earlier stage retrained
    with pytest.raises(StaleRunError, match=f"{start_model} changed after this run"):
        run_state(run, DISTILL, inputs=[start_model, data])


def test_the_saved_config_is_read_through_the_same_loader(tmp_path):
    # An older run saved fewer keys; the loader fills the defaults the current config has.
    def with_defaults(cfg):
        return {**cfg, "new_default": 1}

    run = _finished_run(tmp_path, DISTILL)
    assert run_state(run, with_defaults(DISTILL), normalize=with_defaults) == "done"

    def refuse(cfg):
        raise ValueError("unknown key 'gone'")

    with pytest.raises(StaleRunError, match="no longer loads as a config"):
        run_state(run, DISTILL, normalize=refuse)
