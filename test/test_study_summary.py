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
    table, verdicts = summary.summary_table()
    readme = (REPO / "README.md").read_text()
    assert f"{summary.MARK_BEGIN}\n{table}\n{summary.MARK_END}" in readme
    assert (REPO / "docs/study/results_summary.md").read_text() == summary.summary_page(table, verdicts)
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
