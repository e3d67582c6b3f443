"""scripts/study/write_summary.py: the README's study table is the archive's, arm by arm."""

from __future__ import annotations

from pathlib import Path

from benchmark_scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def _write_summary():
    return load_script(REPO / "scripts" / "study" / "write_summary.py")


def test_readme_study_table_is_the_archived_results():
    """Rerun `python scripts/study/write_summary.py` after archiving a seed: a stale README fails here."""
    summary = _write_summary()
    results = summary.study_results()
    table, verdicts = summary.summary_table(results)
    readme = (REPO / "README.md").read_text()
    assert f"{summary.MARK_BEGIN}\n{table}\n{summary.MARK_END}" in readme
    assert (REPO / "docs/study/results_summary.md").read_text() == summary.summary_page(table, verdicts, results)
    assert "R-unlabelled H2 vlsi_pool - sft_pseudo" in verdicts


def test_teacher_margin_rule_is_checked_per_regime():
    """The pre-registered design rule (teacher >= +0.15 over the label-only arm, mean over seeds)."""
    summary = _write_summary()
    runs = {"teacher": [{"overall": {"accuracy": 0.82}, "seed": 0}],
            "sft_labels": [{"overall": {"accuracy": a}, "seed": s} for s, a in enumerate((0.68, 0.70))]}
    line = summary.teacher_margin_line("R-x", runs)
    assert "= +0.130" in line and "did not hold" in line
    runs["teacher"][0]["overall"]["accuracy"] = 0.85
    assert "**held**" in summary.teacher_margin_line("R-x", runs)
    assert "not measured yet" in summary.teacher_margin_line("R-x", {"teacher": runs["teacher"]})


def test_cells_give_mean_std_and_seed_count():
    summary = _write_summary()
    runs = [{"overall": {"accuracy": a}, "seed": s} for s, a in enumerate((0.70, 0.72, 0.74))]
    assert summary.cell(runs, "vlsi_pool") == "0.720 ± 0.020 (3)"
    assert summary.cell(runs[:1], "vlsi_pool") == "0.700 (1)"
    assert summary.cell(runs[:1], "teacher") == "0.700"  # evaluated once, not per seed
    assert summary.cell([], "vlsi_plain") == "queued"


def test_reported_comparisons_pair_by_seed_and_give_no_verdict():
    """R-few has no pre-registered hypothesis: its differences are reported paired by seed, with the
    95% t-interval once two seeds pair up and how many of the planned five they rest on."""
    summary = _write_summary()
    runs = {"sft_labels": [{"overall": {"accuracy": a}, "seed": s} for s, a in enumerate((0.56, 0.60, 0.58))],
            "vlsi_few": [{"overall": {"accuracy": a}, "seed": s} for s, a in ((0, 0.68), (2, 0.66))]}
    line = summary.reported_line("R-few", runs, "vlsi_few", "A4", "sft_labels", "A1")
    # seeds 0 and 2 pair (+0.12, +0.08; seed 1 has no A4): mean +0.100, sd 0.0283, t(1) = 12.706
    assert "A4 - A1: +0.100 [-0.154, +0.354], 2 of 5 planned seeds" in line
    one_pair = {**runs, "vlsi_few": runs["vlsi_few"][:1]}
    one = summary.reported_line("R-few", one_pair, "vlsi_few", "A4", "sft_labels", "A1")
    assert one.endswith("A4 - A1: +0.120 (one pair: no interval), 1 of 5 planned seeds")
    five = {"a": [{"overall": {"accuracy": 0.6 + 0.01 * s}, "seed": s} for s in range(5)],
            "b": [{"overall": {"accuracy": 0.5}, "seed": s} for s in range(5)]}
    assert summary.reported_line("R-x", five, "a", "A", "b", "B").endswith(
        "A - B: +0.120 [+0.100, +0.140], 5 seeds")
    assert summary.reported_line("R-few", runs, "final_kd_few", "A3", "sft_labels", "A1") is None


def test_train_gap_compares_arms_on_the_seeds_all_were_scored_on():
    summary = _write_summary()

    def run(seed, test, train):
        return {"overall": {"accuracy": test}, "seed": seed, "train": train}

    runs = {"sft_labels": [run(0, 0.6, 1.0), run(1, 0.5, 1.0), run(2, 0.7, None)],
            "final_kd_few": [run(0, 0.7, 0.9)], "vlsi_few": [run(0, 0.8, 1.0), run(1, 0.6, 0.98)]}
    line = summary.train_gap_line(runs)
    assert "seeds 0: A1 labels only train 1.000 / test 0.600 (gap +0.400); A3 final-layer KD train 0.900 / test " \
           "0.700 (gap +0.200); A4 VLsI train 1.000 / test 0.800 (gap +0.200)" in line
    assert line.endswith("; A1 over its 2 seeds train 1.000 / test 0.550 (gap +0.450)")  # seed 2 has no train score
    assert summary.train_gap_line({}) is None


def test_seed_tables_pair_arms_by_seed():
    summary = _write_summary()
    _, _, arms, defining, difference = summary.SEED_TABLES[0]  # R-few's
    runs = {"sft_labels": [{"overall": {"accuracy": 0.56}, "seed": 0, "train": 1.0},
                           {"overall": {"accuracy": 0.60}, "seed": 1, "train": 1.0}],  # seed 1: A1 alone
            "final_kd_few": [{"overall": {"accuracy": 0.63}, "seed": 0, "train": None}],
            "vlsi_few": [{"overall": {"accuracy": 0.68}, "seed": 0, "train": 0.999}]}
    table = summary.seed_table(runs, arms, defining, difference)
    assert "| 0 | 0.560 (1.000) | 0.630 | 0.680 (0.999) | +0.050 |" in table
    assert "| 1 |" not in table  # A1 alone is R-unlabelled's row, not an R-few seed
    assert summary.seed_table({"sft_labels": runs["sft_labels"]}, arms, defining, difference) == ""
    _, _, arms, defining, difference = summary.SEED_TABLES[1]  # A3b / A5 beside A3 / A4
    pool = {"final_kd_t1": [{"overall": {"accuracy": 0.69}, "seed": s} for s in (0, 1, 5)],
            "vlsi_pool": [{"overall": {"accuracy": 0.72}, "seed": s} for s in (0, 1, 5)],
            "vlsi_plain": [{"overall": {"accuracy": 0.70}, "seed": 0}],
            "final_kd_t2": [{"overall": {"accuracy": 0.68}, "seed": s} for s in (0, 1)]}
    lines = summary.seed_table(pool, arms, defining, difference).splitlines()
    assert lines[2:] == ["| 0 | 0.690 | 0.680 | 0.720 | 0.700 | +0.020 |", "| 1 | 0.690 | 0.680 | 0.720 | - | - |"]


def test_sharpness_line_reads_the_inspected_runs(tmp_path):
    """The matching_sharpness.py reports: near-uniform draws say H3 holds by construction; a run
    whose draws followed the divergences says so; agreement split by the runs' seeds."""
    import json
    summary = _write_summary()
    assert summary.sharpness_line(tmp_path) is None

    def report(name, seed, p_max, against=()):
        row = {"p_max_mean": p_max, "uniform": 0.5}
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "run": f"runs/x/{name}/seed{seed}/distill", "stages": {"end": {"by_student_target": {"0": row}}},
            "same_matches": [{"against": f"runs/x/{o}/seed{s}/distill", "same_share": v} for o, s, v in against]}))
    report("a", 0, 0.503, [("b", 0, 0.998), ("c", 1, 0.35)])
    line = summary.sharpness_line(tmp_path)
    assert "likeliest candidate p 0.503-0.503 against uniform 0.500, so the draws were near uniform" in line
    assert line.endswith("runs of one seed 0.998-0.998 of step-2 steps; runs of different seeds 0.350-0.350 "
                         "of step-2 steps")
    report("d", 2, 0.91)
    assert "p 0.503-0.910 against uniform 0.500, so the divergences steered" in summary.sharpness_line(tmp_path)


def test_two_workers_stop_a_driver_when_either_fails(tmp_path):
    """scripts/study/run_two_workers.sh: a driver goes on to later seeds only when both workers of
    a seed succeeded (a crashed worker used to leave the seed half done and the driver moving on)."""
    import os
    import subprocess

    script = REPO / "scripts/study/run_two_workers.sh"
    env = {**os.environ, "ROWS": "vlsi_few", "SEEDS": "3", "WORKER_STAGGER_S": "0"}
    # a worker that fails on its second start (the "b" copy), as one that crashes mid-row would
    worker = tmp_path / "worker.sh"
    worker.write_text(f"#!/bin/sh\necho run >> {tmp_path}/runs\n[ $(wc -l < {tmp_path}/runs) -lt 2 ]\n")
    worker.chmod(0o755)
    failed = subprocess.run([str(script), str(worker), str(tmp_path / "log")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "a worker failed" in failed.stderr
    assert (tmp_path / "log_a.log").exists() and (tmp_path / "log_b.log").exists()
    ok = subprocess.run([str(script), "/bin/true", str(tmp_path / "ok")], env=env, timeout=60)
    assert ok.returncode == 0
