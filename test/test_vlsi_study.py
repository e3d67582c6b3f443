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


def test_summary_mean_and_std():
    import vlsi_study

    rows = [vlsi_study.Row("a", "sft", "A")]
    res = {"a": [{"overall": {"accuracy": a}, "families": {"count": {"accuracy": a, "prior": 0.3}}}
                 for a in (0.5, 0.7)]}
    table, summary = vlsi_study.summarise(rows, res)
    assert "0.600 ± 0.141" in table and "0.300" in table
    assert summary["a"]["overall_mean"] == pytest.approx(0.6)


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
