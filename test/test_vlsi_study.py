"""benchmarks/vlsi_study.py --smoke: every row of the study runs end to end on tiny models
(1-2 steps per row, one seed), writes its table and heatmaps, and a re-run resumes (skips
every finished row instead of retraining)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_rows_cover_the_paper_ablations():
    import vlsi_study

    names = {r.name for r in vlsi_study.study_rows()}
    assert {"teacher", "student_sft", "final_kl_only", "vlsi_full", "no_step3", "cached_teacher",
            "ops_ce_none", "ops_kld_none"} <= names
    assert {f"match_{v}" for v in ("random", "uniform", "bottom1", "multinomial", "window", "order")} <= names


def test_summary_mean_std_and_paired_difference():
    import vlsi_study

    rows = [vlsi_study.Row("a", "sft", "A"), vlsi_study.Row("vlsi_full", "distill", "full")]

    def result(acc, seed, minutes=2.0, constant=False):
        top = [["1", 4]] if constant else [["1", 3], ["2", 1]]
        return {"overall": {"accuracy": acc}, "families": {"count": {"accuracy": acc, "prior": 0.3}},
                "question_types": {"count/objects": {"n": 4, "accuracy": acc, "top_predictions": top}},
                "seed": seed, "train_seconds": minutes * 60}

    res = {"a": [result(0.5, 0), result(0.7, 1), result(0.4, 2)],
           "vlsi_full": [result(0.55, 0, 4.0, constant=True), result(0.72, 1, 4.0)]}  # seed 2 unfinished: not paired
    table, summary = vlsi_study.summarise(rows, res)
    assert "0.533 ± 0.153" in table and "0.300" in table
    assert summary["a"]["overall_mean"] == pytest.approx(0.5333, abs=1e-4)
    # paired by seed: (0.5 - 0.55), (0.7 - 0.72) -> mean -0.035, std 0.021, 2 pairs
    assert summary["a"]["paired_delta_vs_vlsi_full"] == pytest.approx([-0.05, -0.02])
    assert "-0.035 ± 0.021 (n=2)" in table
    line_full = next(ln for ln in table.splitlines() if ln.startswith("| full |"))
    assert "(n=" not in line_full and "| 4.0 |" in line_full  # the reference has no delta; its train minutes
    assert summary["vlsi_full"]["constant_templates"] == [1, 0] and "| 0.5 | 4.0 |" in line_full
    assert summary["a"]["constant_templates"] == [0, 0, 0]


def test_summary_adds_a_column_per_extra_test_set():
    """--extra-test NAME=FILE: each row's score on the set is a column (mean ± std over the seeds that
    have it), with the set's prior when it holds one family."""
    import vlsi_study

    rows = [vlsi_study.Row("a", "sft", "A")]

    def result(acc, seed, spatial=None):
        r = {"overall": {"accuracy": acc}, "families": {"count": {"accuracy": acc, "prior": 0.3}}, "seed": seed}
        if spatial is not None:
            r["extra"] = {"spatial": {"overall": {"accuracy": spatial},
                                      "families": {"spatial": {"accuracy": spatial, "prior": 0.51}}}}
        return r

    table, summary = vlsi_study.summarise(rows, {"a": [result(0.5, 0, 0.6), result(0.7, 1, 0.8), result(0.4, 2)]})
    header, _, line, prior = table.splitlines()
    assert "| count | spatial (set) |" in header
    assert line.split(" | ")[3:5] == ["0.533 ± 0.153", "0.700 ± 0.141"]  # seed 2 has no spatial score
    assert "| 0.300 | 0.510 |" in prior
    assert summary["a"]["extra_tests"] == {"spatial": [0.6, 0.8]}
    assert len({ln.count("|") for ln in table.splitlines()}) == 1  # every line has the header's columns


def test_row_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    """Parallel workers share rows through file_lock: a held (row, seed) is refused to the others,
    and a killed worker's claim disappears with it (its row can be resumed at once)."""
    import vlsi_study

    lock = tmp_path / "rows" / "vlsi_full" / "seed0" / ".lock"
    with vlsi_study.file_lock(lock, blocking=False) as first, vlsi_study.file_lock(lock, blocking=False) as second:
        assert first and not second
    with vlsi_study.file_lock(lock, blocking=False) as again:
        assert again
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import vlsi_study\n"
         "with vlsi_study.file_lock(__import__('pathlib').Path(sys.argv[2])):\n"
         "    print('held', flush=True); time.sleep(60)", str(REPO / "benchmarks"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with vlsi_study.file_lock(lock, blocking=False) as while_held:
            assert not while_held
    finally:
        holder.kill()
        holder.wait()
    with vlsi_study.file_lock(lock, blocking=False) as after_kill:
        assert after_kill


def test_shipped_distill_config_is_the_study_full_row():
    """configs/nano/distill_student.yaml (scripts/train_default_student.sh's distillation) is the study's
    `vlsi_full` row, seed 0, with the study's settings, started from the SFT student: what the study
    measured is what the script ships."""
    import vlsi_study

    from vlsi_model.distill.config import load_distill_config
    a = vlsi_study.StudyArgs(
        out=Path("unused"), teacher=Path("runs/nano/teacher_grown/final"),
        train_data=Path("runs/nano/data_teacher/train_mix_teacher.json"), test_data=Path("unused"),
        student_init="runs/nano/student_grids/final", seeds=[0], budget=400,
        interact_fraction=0.5, verbalize_steps=200, batch_size=32, lr=5e-4, max_length=128, eval_samples=1400,
        student_targets=vlsi_study.NANO_STUDENT_TARGETS, teacher_targets=vlsi_study.NANO_TEACHER_TARGETS,
        lora=vlsi_study.NANO_LORA)
    row = vlsi_study.base_distill_config(a, 0, Path("runs/nano/vlsi_student"), 200, 200)
    assert load_distill_config(REPO / "configs" / "nano" / "distill_student.yaml") == load_distill_config(row)


def test_a_random_student_trains_its_whole_language_model_in_step2():
    """From a random init, step 2 trains embeddings and LM head too (SFT trains them from step 1);
    a pretrained student keeps the paper's decoder-only step 2; an explicit choice wins."""
    import vlsi_study

    from vlsi_model.distill.config import load_distill_config
    assert vlsi_study.default_interact_trains("random") == "language_model"
    assert vlsi_study.default_interact_trains("runs/nano/student_grids/final") == "decoder"
    a = vlsi_study.StudyArgs(
        out=Path("unused"), teacher=Path("t"), train_data=Path("d.json"), test_data=Path("unused"),
        student_init="s", seeds=[0], budget=400, interact_fraction=0.5, verbalize_steps=200, batch_size=32,
        lr=1e-3, max_length=128, eval_samples=None, student_targets=vlsi_study.NANO_STUDENT_TARGETS,
        teacher_targets=vlsi_study.NANO_TEACHER_TARGETS, lora=vlsi_study.NANO_LORA, interact_trains="language_model")
    row = load_distill_config(vlsi_study.base_distill_config(a, 0, Path("out"), 200, 200))
    assert row.student.interact_trains == "language_model"


@pytest.mark.slow
def test_smoke_runs_every_row_and_resumes(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "benchmarks" / "vlsi_study.py"), "--smoke", "--out", str(out), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "results.json").read_text())["rows"]
    import vlsi_study

    for row in vlsi_study.study_rows():
        assert summary[row.name]["seeds"] == 1, row.name
        assert 0.0 <= summary[row.name]["overall_mean"] <= 1.0
    table = (out / "results.md").read_text()
    assert "VLsI (full)" in table and "matching: random" in table
    assert (out / "matching_heatmap.png").is_file() and (out / "matching_variants.png").is_file()
    # No row trains the student's vision encoder (default): its weights come out as they went in.
    from safetensors.torch import load_file

    init = load_file(str(out / "smoke_inputs" / "student" / "model.safetensors"))
    vision = [k for k in init if "visual." in k]
    for trained in (out / "rows" / "vlsi_full" / "seed0" / "distill" / "final",
                    out / "rows" / "student_sft" / "seed0" / "sft" / "final"):
        weights = load_file(str(trained / "model.safetensors"))
        assert vision and all(torch.equal(init[k], weights[k]) for k in vision), trained
    # (the SFT row's 2 steps move the language model; the smoke's 1-step distill stages run at warm-up LR 0)
    assert any(not torch.equal(init[k], weights[k]) for k in init if k not in vision)
    stamp = (out / "rows" / "vlsi_full" / "seed0" / "eval.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (out / "rows" / "vlsi_full" / "seed0" / "eval.json").stat().st_mtime_ns == stamp  # skipped, not redone
    # A test set added later is scored from the models the finished rows kept, without retraining them.
    sft_final = out / "rows" / "student_sft" / "seed0" / "sft" / "final" / "model.safetensors"
    trained_at = sft_final.stat().st_mtime_ns
    test_json = out / "smoke_inputs" / "data" / "test.json"
    later = subprocess.run(cmd + ["--rows", "teacher,student_sft", "--extra-test", f"later={test_json}",
                                  "--archive", str(tmp_path / "archive")],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
    assert later.returncode == 0, later.stderr[-4000:]
    assert sft_final.stat().st_mtime_ns == trained_at
    row = json.loads((out / "rows" / "student_sft" / "seed0" / "eval.json").read_text())
    # the same file as the main test split: the same score
    assert row["extra"]["later"]["overall"]["accuracy"] == row["overall"]["accuracy"]
    kept = json.loads((tmp_path / "archive" / "student_sft" / "seed0.json").read_text())
    assert kept["extra"]["later"] == row["extra"]["later"] and kept["seed"] == 0  # the archive has it too
    assert "later (set)" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["rows"]["student_sft"]["extra_tests"]["later"] == [
        row["overall"]["accuracy"]]


def test_preregistered_comparisons_give_paired_intervals_and_verdicts():
    import vlsi_study

    def result(acc: float, seed: int) -> dict:
        return {"overall": {"accuracy": acc}, "families": {}, "seed": seed}

    results = {"sft_labels": [result(0.60, s) for s in range(5)],
               "sft_pseudo": [result(0.70 + 0.01 * s, s) for s in range(5)],
               "vlsi_pool": [result(0.75 + 0.01 * s, s) for s in range(5)],
               "final_kd_t1": [result(0.74 + 0.01 * s + (0.002 if s % 2 else -0.002), s) for s in range(5)]}
    table, rows = vlsi_study.preregistered_comparisons(results)
    by_pair = {(r["better"], r["worse"]): r for r in rows}
    h1 = by_pair[("sft_pseudo", "sft_labels")]
    assert h1["hypothesis"] == "H1" and h1["pairs"] == 5 and h1["verdict"] == "held"
    assert h1["mean"] == pytest.approx(0.12) and h1["ci95"][0] > 0.05
    h2 = by_pair[("vlsi_pool", "sft_pseudo")]  # +0.05 every seed: held
    assert h2["verdict"] == "held"
    h2_kd = by_pair[("vlsi_pool", "final_kd_t1")]  # +0.01 +- 0.002: under 0.02 -> 3 more seeds
    assert h2_kd["verdict"].startswith("open (|difference| < 0.02")
    assert ("oracle", "sft_labels") not in by_pair  # a row not run is not compared
    assert "| H2 | vlsi_pool - sft_pseudo | 5 |" in table
    # fewer seeds than pre-registered: no verdict yet, whichever way the interim interval points
    early = {name: rs[:2] for name, rs in results.items()}
    _, rows = vlsi_study.preregistered_comparisons(early)
    assert all(r["verdict"].startswith("open (2 of 5 seeds") for r in rows)
    results["sft_pseudo"] = [result(0.60 + 0.004 * (s % 2), s) for s in range(5)]  # +0.002: interval straddles 0
    _, rows = vlsi_study.preregistered_comparisons(results)
    assert next(r for r in rows if r["better"] == "sft_pseudo")["verdict"] == "did not hold"


def test_rows_train_on_their_named_sources(tmp_path):
    import vlsi_study

    labels, teacher = tmp_path / "labels.json", tmp_path / "teacher.json"
    labels.write_text(json.dumps([{}] * 3))
    teacher.write_text(json.dumps([{}] * 12))
    a = vlsi_study.StudyArgs(tmp_path, tmp_path, tmp_path / "train.json", tmp_path / "test.json", "random", [0], 10,
                             0.5, 1, 2, 1e-3, 64, None, {}, {}, {}, sources={"labels": labels, "teacher": teacher})
    rows = {r.name: r for r in vlsi_study.study_rows()}
    assert vlsi_study.row_train_data(rows["sft_labels"], a) == str(labels)
    assert vlsi_study.row_train_data(rows["vlsi_pool"], a) == [
        {"path": str(labels), "name": "labels", "weight": 3.0}, {"path": str(teacher), "name": "teacher",
                                                                  "weight": 12.0}]
    assert vlsi_study.row_train_data(rows["student_sft"], a) == str(tmp_path / "train.json")
    # R-few: the teacher's signal on the labelled frames alone (the same data as A1)
    for name in ("final_kd_few", "vlsi_few"):
        assert rows[name].kind == "distill" and vlsi_study.row_train_data(rows[name], a) == str(labels)
    with pytest.raises(ValueError, match="--source NAME=FILE"):
        vlsi_study.row_train_data(rows["oracle"], a)



def test_open_forms_make_content_match_every_figure(tmp_path):
    """R-open (amendment 2): tables, comparisons and the copying analysis read content match; the
    exact-match figures stay in the result."""
    import vlsi_study

    from vlsi_model.evaluation import EvalSample, score

    samples = [EvalSample(0, "a", Path("x.png"), "What objects are there?", "red circle blue square", "caption"),
               EvalSample(1, "b", Path("x.png"), "How many circles are there?", "2", "count")]
    results = vlsi_study.content_as_primary(score(samples, ["azure box and scarlet dot", "3"], open_forms=True))
    assert results["overall"]["accuracy"] == 0.5 and results["exact"]["overall"]["accuracy"] == 0.0
    assert results["families"]["caption"]["accuracy"] == 1.0
    assert results["families"]["caption"]["exact_accuracy"] == 0.0
    assert results["overall"]["list_set_f1"] == 1.0 and results["primary"] == "content match"

    records = [{"id": str(i), "image": "x.png", "family": s.family,
                "conversations": [{"from": "human", "value": "<image>\n" + s.question},
                                  {"from": "gpt", "value": s.reference}]} for i, s in enumerate(samples)]
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps(records))
    teacher = {"answers": ["red circle green square", "2"], "seed": 0}  # wrong on the caption only
    student = {"answers": ["lime box and crimson disc", "2"], "seed": 0}  # the teacher's error, other words
    rows = {"teacher": [teacher], "sft_pseudo": [student]}
    _, by_content = vlsi_study.teacher_error_copying(rows, test_json, open_forms=True)
    _, by_string = vlsi_study.teacher_error_copying(rows, test_json)
    assert by_content["sft_pseudo"]["all"] == 1.0 and by_string["sft_pseudo"]["all"] == 0.0


def test_results_scored_otherwise_are_refused_not_mixed(tmp_path):
    """An exact-match result found where an --open-forms study looks (or the reverse) is an error
    naming the file, not a row silently scored another way."""
    import vlsi_study

    a = vlsi_study.StudyArgs(tmp_path, tmp_path, tmp_path / "train.json", tmp_path / "test.json", "random", [0], 10,
                             0.5, 1, 2, 1e-3, 64, None, {}, {}, {}, open_forms=True)
    row = next(r for r in vlsi_study.study_rows() if r.name == "sft_labels")
    result_file = vlsi_study._row_dir(row, a, 0) / "eval.json"
    result_file.parent.mkdir(parents=True)
    result_file.write_text(json.dumps({"overall": {"accuracy": 0.5}, "families": {}}))
    with pytest.raises(ValueError, match="scored by exact match, this study by content match"):
        vlsi_study.finished_result(row, a, 0)
    result_file.write_text(json.dumps({"overall": {"accuracy": 0.5}, "families": {}, "primary": "content match"}))
    assert vlsi_study.finished_result(row, a, 0)["overall"]["accuracy"] == 0.5


def test_a_distill_rows_matching_statistics_are_archived_beside_its_result(tmp_path):
    """H3 is judged from each VLsI row's matching statistics; runs/ does not outlive the machine,
    so the archive keeps them (an SFT row has none; final-layer KD's matches train nothing)."""
    import vlsi_study

    from vlsi_model.distill.config import INTERACTION_DIR
    a = vlsi_study.StudyArgs(tmp_path / "out", tmp_path, tmp_path / "train.json", tmp_path / "test.json", "random",
                             [3], 10, 0.5, 1, 2, 1e-3, 64, None, {}, {}, {}, archive=tmp_path / "archive")
    rows = {r.name: r for r in vlsi_study.study_rows()}
    stats = vlsi_study._row_dir(rows["vlsi_pool"], a, 3) / "distill" / INTERACTION_DIR / "matching_stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text('{"student_layers": [1, 2, 3]}')
    kept = vlsi_study.archive_matching_stats(rows["vlsi_pool"], a, 3)
    assert kept == tmp_path / "archive" / "vlsi_pool" / "matching_stats_seed3.json"
    assert json.loads(kept.read_text()) == {"student_layers": [1, 2, 3]}
    assert vlsi_study.archive_matching_stats(rows["sft_pseudo"], a, 3) is None
    kd = vlsi_study._row_dir(rows["final_kd_t1"], a, 3) / "distill" / INTERACTION_DIR / "matching_stats.json"
    kd.parent.mkdir(parents=True)
    kd.write_text('{"student_layers": [1, 2, 3]}')  # recorded, but no loss trained on these matches
    assert vlsi_study.archive_matching_stats(rows["final_kd_t1"], a, 3) is None
    assert vlsi_study.archive_matching_stats(rows["vlsi_pool"], a, 4) is None  # that seed has not run


def test_h3_reads_the_modal_teacher_target_early_and_late():
    import vlsi_study

    ordered = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0], [0.0, 0.0, 0.1, 0.9]]
    crossed = [[0.0, 0.0, 0.8, 0.2], [0.0, 0.9, 0.1, 0.0], [0.0, 0.0, 0.1, 0.9]]  # student 1 deeper than 2
    assert vlsi_study.matching_order_preserving({"early": {"frequency": ordered}, "late": {"frequency": ordered}})
    assert not vlsi_study.matching_order_preserving({"early": {"frequency": ordered}, "late": {"frequency": crossed}})
    assert not vlsi_study.matching_order_preserving({"early": {"frequency": crossed}, "late": {"frequency": ordered}})


def test_only_result_files_count_as_archived_results(tmp_path):
    """The report, the summary and the input check read the archive's (row, seed) results; the
    matching statistics beside them are not results."""
    import vlsi_study

    for name in ("vlsi_pool/seed0.json", "vlsi_pool/matching_stats_seed0.json", "teacher/all.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert [(row, seed, p.relative_to(tmp_path).as_posix()) for row, seed, p in
            vlsi_study.archived_result_files(tmp_path)] == [("teacher", 0, "teacher/all.json"),
                                                           ("vlsi_pool", 0, "vlsi_pool/seed0.json")]
