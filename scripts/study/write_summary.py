"""The pre-registered study at a glance: every arm x regime from the archived per-seed results.

    python scripts/study/write_summary.py            # docs/study/results_summary.md + the README's table

Reads only the committed archive (docs/study/r_unlabelled/, docs/study/r_open/arms/), so it runs on a
fresh checkout in seconds. Each cell is the test split's mean ± std over seeds (content match in
R-open, exact match elsewhere) with the number of seeds; an arm the pre-registration does not run
in a regime says so, one queued but not yet run says "queued". The README's copy sits between the
`<!-- study-summary -->` markers; the verdicts come from benchmarks/vlsi_study.py's pre-registered
comparisons, so the two never disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import vlsi_study  # noqa: E402  (benchmarks/ is not a package)

# (label, row in R-unlabelled, row in R-few, row in R-open); None: not in that regime's design.
ARMS = (
    ("teacher", "teacher", "teacher", "teacher"),
    ("A1 SFT on the 500 labels", "sft_labels", "sft_labels", "sft_labels"),
    ("A2 + teacher labels (seq. KD)", "sft_pseudo", None, "sft_pseudo"),
    ("A3 final-layer KD, T=1", "final_kd_t1", "final_kd_few", "final_kd_t1"),
    ("A3b final-layer KD, T=2", "final_kd_t2", None, None),
    ("**A4 VLsI**", "vlsi_pool", "vlsi_few", "vlsi_pool"),
    ("A5 VLsI, plain verbalizer", "vlsi_plain", None, None),
    ("O + the pool's true labels", "oracle", None, None),
)
REGIMES = (("R-unlabelled", "docs/study/r_unlabelled"), ("R-few", "docs/study/r_unlabelled"),
           ("R-open (content)", "docs/study/r_open/arms"))
README_LIMIT = 15 * 1024  # test/test_readme_commands.py: the README stays a short user's guide
MARK_BEGIN, MARK_END = "<!-- study-summary -->", "<!-- /study-summary -->"


def archived_results(archive: Path) -> dict[str, list[dict[str, Any]]]:
    """Every archived (row, seed) result, by row: the accuracy the regime scores by, and the seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row, seed, path in vlsi_study.archived_result_files(archive):
        # the seed the file is named by: the pairing key of every comparison
        result = json.loads(path.read_text())
        train = result.get("extra", {}).get("train", {}).get("overall", {}).get("accuracy")
        out.setdefault(row, []).append({"overall": result["overall"], "seed": seed, "train": train})
    return out


def cell(runs: list[dict[str, Any]] | None, row: str) -> str:
    """'mean ± std (n)' over seeds; one seed has no std; none: 'queued'; the teacher, evaluated
    once (it is not trained per seed), its figure alone."""
    if not runs:
        return "queued"
    figure = vlsi_study.mean_std([r["overall"]["accuracy"] for r in runs])
    return figure if row == "teacher" else f"{figure} ({len(runs)})"


def study_results() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every regime's archived results, by regime then row; an archive two regimes share (R-few's
    rows sit beside R-unlabelled's) is read once."""
    by_archive = {archive: archived_results(REPO / archive) for archive in {archive for _, archive in REGIMES}}
    return {name: by_archive[archive] for name, archive in REGIMES}


def summary_table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> tuple[str, str]:
    """The arms x regimes table (markdown) and the pre-registered verdict lines under it, from
    `study_results()`."""
    lines = ["| arm | " + " | ".join(name for name, _ in REGIMES) + " |", "|---|" + "---:|" * len(REGIMES)]
    for label, *rows in ARMS:
        cells = [cell(results[regime].get(row), row) if row else "n/a" for (regime, _), row in zip(REGIMES, rows,
                                                                                           strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = []
    short = {regime for regime in ("R-unlabelled", "R-open (content)")
             if (figures := teacher_margin(results[regime])) and figures[0] - figures[1] < TEACHER_MARGIN}
    for regime in ("R-unlabelled", "R-open (content)"):
        _, comparisons = vlsi_study.preregistered_comparisons(results[regime])
        for c in comparisons:
            if c["hypothesis"] in ("H1", "H2"):
                ci = f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else ""
                seeds = f"{c['pairs']} seed" + ("s" if c["pairs"] != 1 else "")
                # H1 is pre-registered in R-unlabelled only; elsewhere its test is reported, not a hypothesis
                beside = " (beside: H1 is pre-registered in R-unlabelled)" if (
                    c["hypothesis"] == "H1" and regime != "R-unlabelled") else ""
                verdict = f"**{c['verdict']}**"
                if beside:  # not a hypothesis here: where it stands against R-unlabelled's bar, no verdict
                    above = c["ci95"] is not None and c["ci95"][0] > 0
                    verdict = (f"{'at or above' if c['mean'] >= c['threshold'] else 'under'} the "
                               f"{c['threshold']:.2f} bar, interval {'above' if above else 'not above'} 0")
                verdicts.append(f"{regime} {c['hypothesis']}{beside} {c['better']} - {c['worse']}: "
                                f"{c['mean']:+.3f}{ci}, {seeds}: {verdict}{SHORT_NOTE * (regime in short)}")
    for regime, archive in (REGIMES[0], REGIMES[2]):
        verdicts.append(h3_line(regime, REPO / archive / "vlsi_pool") + SHORT_NOTE * (regime in short))
    # R-few's VLsI arm and A5 (the plain verbalizer) match layers too (H3 is pre-registered for the
    # full method, not for a regime or a verbalizer)
    for name, row in (("R-few", "vlsi_few"), ("R-unlabelled A5 (plain verbalizer)", "vlsi_plain")):
        if any((REPO / REGIMES[0][1] / row).glob("matching_stats_seed*.json")):
            verdicts.append(h3_line(name, REPO / REGIMES[0][1] / row))
    for regime in ("R-unlabelled", "R-open (content)"):  # R-few's A1 and teacher are R-unlabelled's
        verdicts.append(teacher_margin_line(regime, results[regime]))
    reported = [reported_line(regime, results[regime], *comparison) for regime, *comparison in REPORTED]
    reported.append(train_gap_line(results["R-few"]))
    reported.append(sharpness_line(REPO / "docs/study/matching_sharpness"))
    return "\n".join(lines), "\n".join(f"- {v}" for v in verdicts + [r for r in reported if r])


# Comparisons the pre-registration asks to report with no hypothesis on them (R-few, and the arms run
# last beside the ones H2 names): (regime, arm, its label, reference arm, its label).
REPORTED = (
    ("R-few", "final_kd_few", "A3", "sft_labels", "A1"),
    ("R-few", "vlsi_few", "A4 VLsI", "sft_labels", "A1"),
    ("R-few", "vlsi_few", "A4 VLsI", "final_kd_few", "A3"),
    ("R-unlabelled", "final_kd_t2", "A3b (T=2)", "final_kd_t1", "A3 (T=1)"),
    ("R-unlabelled", "vlsi_pool", "A4 VLsI", "final_kd_t2", "A3b (T=2)"),
    ("R-unlabelled", "vlsi_pool", "A4 VLsI (residual verbalizer)", "vlsi_plain", "A5 (plain verbalizer)"),
)
PLANNED_SEEDS = 5  # pre-registered for every arm
R_FEW_ARMS = (("sft_labels", "A1 labels only"), ("final_kd_few", "A3 final-layer KD"), ("vlsi_few", "A4 VLsI"))


def reported_line(regime: str, results: dict[str, list[dict[str, Any]]], arm: str, arm_label: str,
                  reference: str, reference_label: str) -> str | None:
    """A paired difference with its 95% interval, stated as reported (no threshold, no verdict),
    with how many of the planned seeds it rests on; None until a seed of both arms is archived."""
    differences = vlsi_study.paired_delta(results.get(arm, []), results.get(reference, []))
    if not differences:
        return None
    ci = vlsi_study.paired_interval(differences)
    mean, interval = (ci[0], f" [{ci[1]:+.3f}, {ci[2]:+.3f}]") if ci else (differences[0], " (one pair: no interval)")
    seeds = f"{len(differences)} of {PLANNED_SEEDS} planned seeds" if len(differences) < PLANNED_SEEDS else (
        f"{len(differences)} seeds")
    return (f"{regime} (reported, no hypothesis pre-registered) {arm_label} - {reference_label}: "
            f"{mean:+.3f}{interval}, {seeds}")


def train_gap_line(results: dict[str, list[dict[str, Any]]]) -> str | None:
    """R-few's train-vs-test gap per arm (pre-registered for A1: does SFT on 500 frames overfit?):
    accuracy on the arm's own 4,676 training questions minus the test split's, over the seeds every
    arm present was scored on (so the arms are compared on the same seeds), and A1 over all of its
    own beside when it has more."""
    scored = {arm: {r["seed"]: r for r in results.get(arm, []) if r.get("train") is not None}
              for arm, _ in R_FEW_ARMS}
    scored = {arm: runs for arm, runs in scored.items() if runs}
    if not scored:
        return None
    common = sorted(set.intersection(*(set(runs) for runs in scored.values())))
    if not common:
        return None

    def gap(runs: list[dict[str, Any]]) -> str:
        train, test = sum(r["train"] for r in runs) / len(runs), mean_accuracy(runs)
        return f"train {train:.3f} / test {test:.3f} (gap {train - test:+.3f})"

    labels = dict(R_FEW_ARMS)
    parts = [f"{labels[arm]} {gap([runs[s] for s in common])}" for arm, runs in scored.items()]
    a1 = scored.get("sft_labels", {})
    beside = (f"; A1 over its {len(a1)} seeds {gap(list(a1.values()))}" if len(a1) > len(common) else "")
    return (f"R-few train-vs-test gap (train: the arm's own 4,676 training questions, 500 VQA + 500 caption "
            f"frames), seeds {', '.join(map(str, common))}: " + "; ".join(parts) + beside)


NEAR_UNIFORM_P_MAX = 0.6  # a 2-candidate draw whose likeliest candidate gets under 0.6 is close to a coin


def sharpness_line(archive: Path) -> str | None:
    """What H3's "held" is worth: how far from uniform the adaptive matching drew in the runs
    `scripts/study/matching_sharpness.py` inspected (the likeliest candidate's probability per
    student target, both ends of step 2), and how often runs of one matching seed drew the same
    matches, apart from runs of another seed. None before any run was inspected."""
    reports = [json.loads(p.read_text()) for p in sorted(archive.glob("*.json"))]
    if not reports:
        return None
    rows = [row for r in reports for stage in r["stages"].values() for row in stage["by_student_target"].values()]
    p_max, uniform = [row["p_max_mean"] for row in rows], {row["uniform"] for row in rows}
    seeds = {r["run"]: int(Path(r["run"]).parent.name.removeprefix("seed")) for r in reports}
    same, other = [], []
    for r in reports:
        for a in r.get("same_matches", []):
            (same if int(Path(a["against"]).parent.name.removeprefix("seed")) == seeds[r["run"]] else other).append(
                a["same_share"])
    verdict = ("so the draws were near uniform and H3 holds by construction" if max(p_max) < NEAR_UNIFORM_P_MAX
               else "so the divergences steered at least some draws")
    agreement = "".join(f"; {label} {min(v):.3f}-{max(v):.3f} of step-2 steps" for label, v in (
        ("same matches, runs of one seed", same), ("runs of different seeds", other)) if v)
    return (f"Adaptive matching (reported; {len(reports)} runs inspected by scripts/study/matching_sharpness.py): "
            f"likeliest candidate p {min(p_max):.3f}-{max(p_max):.3f} against uniform "
            f"{'/'.join(f'{u:.3f}' for u in sorted(uniform))}, {verdict}{agreement}")


TEACHER_MARGIN = 0.15  # pre-registered: the teacher >= +0.15 above every label-only arm, mean over seeds
SHORT_NOTE = " (in a regime short of the teacher margin)"


def mean_accuracy(runs: list[dict[str, Any]]) -> float:
    return sum(r["overall"]["accuracy"] for r in runs) / len(runs)


def teacher_margin(results: dict[str, list[dict[str, Any]]]) -> tuple[float, float] | None:
    """(teacher, label-only arm A1 as a mean over seeds), whose difference the rule bounds; None
    until both are archived."""
    if not results.get("teacher") or not results.get("sft_labels"):
        return None
    return results["teacher"][0]["overall"]["accuracy"], mean_accuracy(results["sft_labels"])


def teacher_margin_line(regime: str, results: dict[str, list[dict[str, Any]]]) -> str:
    """The pre-registered design rule: the teacher at least +0.15 above every label-only arm on the
    test split (mean over seeds), else the regime "is reported as not testing what it should": a
    teacher barely above its students leaves distillation little to pass on. The label-only arm is
    A1 (the regime's labelled frames); the oracle, trained on true labels the regime does not have,
    is the ceiling reference, reported beside."""
    figures = teacher_margin(results)
    if figures is None:
        return f"{regime} teacher margin over A1: not measured yet"
    teacher, labels_only = figures
    margin = teacher - labels_only
    verdict = ("held" if margin >= TEACHER_MARGIN
               else "did not hold: the regime is reported as not testing what it should")
    oracle = (f"; over the oracle (the ceiling reference, {len(results['oracle'])} seeds) "
              f"{teacher - mean_accuracy(results['oracle']):+.3f}") if results.get("oracle") else ""
    return (f"{regime} teacher margin (design rule): teacher {teacher:.3f} - A1 {labels_only:.3f} "
            f"({len(results['sft_labels'])} seeds) = {margin:+.3f}, >= +{TEACHER_MARGIN:.2f} required: "
            f"**{verdict}**{oracle}")


def h3_line(regime: str, row_archive: Path, planned: int = 5) -> str:
    """H3 over the VLsI row's archived matching statistics: held once it holds at every one of at
    least `planned` seeds, did not hold as soon as one seed breaks the order."""
    stats = {int(p.stem.removeprefix("matching_stats_seed")): json.loads(p.read_text())
             for p in row_archive.glob("matching_stats_seed*.json")}
    holding = [seed for seed, st in sorted(stats.items()) if vlsi_study.matching_order_preserving(st)]
    if len(holding) < len(stats):
        verdict = "did not hold"
    elif len(stats) >= planned:
        verdict = "held"
    else:
        verdict = f"open ({len(stats)} of {planned} seeds)"
    seeds = ", ".join(str(s) for s in sorted(stats)) or "none archived"
    return (f"{regime} H3 order-preserving matching (modal teacher target, early and late): {len(holding)} of "
            f"{len(stats)} seeds ({seeds}): **{verdict}**")


# Seed-by-seed tables under the summary: (title, regime, arms with labels, the arms whose seeds make
# the table, the difference column). R-few's A1 is R-unlabelled's, so its seeds come from A3 / A4;
# A3b / A5 sit beside the A3 / A4 runs of the same seeds.
SEED_TABLES = (
    ("R-few seed by seed (test split; in brackets the arm's own 500 training frames)", "R-few", R_FEW_ARMS,
     ("final_kd_few", "vlsi_few"), ("vlsi_few", "final_kd_few", "A4 - A3")),
    ("R-unlabelled's A3b / A5 seed by seed, beside A3 / A4 of the same seeds (test split)", "R-unlabelled",
     (("final_kd_t1", "A3 T=1"), ("final_kd_t2", "A3b T=2"), ("vlsi_pool", "A4 VLsI"),
      ("vlsi_plain", "A5 plain verbalizer")), ("final_kd_t2", "vlsi_plain"), ("vlsi_pool", "vlsi_plain", "A4 - A5")),
)


def seed_table(results: dict[str, list[dict[str, Any]]], arms: tuple[tuple[str, str], ...],
               defining: tuple[str, ...], difference: tuple[str, str, str]) -> str:
    """Arms side by side per seed: the test accuracy, the training-frame accuracy in brackets where
    scored, and one paired difference (what a mean hides when it flips sign between seeds). Only
    the seeds of the `defining` arms; '' when they have none."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for arm, _ in arms:
        for r in results.get(arm, []):
            by_seed.setdefault(r["seed"], {})[arm] = r
    seeds = sorted(s for s, present in by_seed.items() if any(arm in present for arm in defining))
    if not seeds:
        return ""

    def figure(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{r['overall']['accuracy']:.3f}" + (f" ({r['train']:.3f})" if r.get("train") is not None else "")

    better, worse, label = difference
    lines = ["| seed | " + " | ".join(name for _, name in arms) + f" | {label} |",
             "|---|" + "---:|" * (len(arms) + 1)]
    for seed in seeds:
        present = by_seed[seed]
        delta = (f"{present[better]['overall']['accuracy'] - present[worse]['overall']['accuracy']:+.3f}"
                 if better in present and worse in present else "-")
        lines.append(f"| {seed} | " + " | ".join(figure(present.get(arm)) for arm, _ in arms) + f" | {delta} |")
    return "\n".join(lines)


def summary_page(table: str, verdicts: str, results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """docs/study/results_summary.md: the table, what its cells mean, the verdicts, the seed-by-seed tables."""
    note = ("Test split, mean ± std (seeds); R-open scores content match (synonyms, list order and "
            "number words seen through), the others exact match. n/a: not in that regime's design (R-few "
            "has no pool; R-open runs A1-A4). R-few's A1 is R-unlabelled's A1, the same runs.")
    tables = "".join(f"\n{title}:\n\n{rows}\n" for title, regime, *spec in SEED_TABLES
                     if (rows := seed_table(results[regime], *spec)))
    return ("# The pre-registered study: every arm x regime\n\nWritten by `python scripts/study/write_summary.py` "
            f"from the archived per-seed results.\n\n{table}\n\n{note}\n\nPre-registered comparisons (paired by "
            f"seed, 95% interval), then those reported without a hypothesis and R-few's train-vs-test gap:"
            f"\n\n{verdicts}\n{tables}")


def readme_with_table(text: str, table: str) -> str:
    """The README with `table` between the markers; ValueError without them."""
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {MARK_BEGIN} ... {MARK_END} block")
    return text[:begin + len(MARK_BEGIN)] + "\n" + table + "\n" + text[end:]


def main() -> int:
    results = study_results()
    table, verdicts = summary_table(results)
    readme = REPO / "README.md"
    text = readme_with_table(readme.read_text(), table)
    if len(text.encode()) > README_LIMIT:
        print(f"README.md would be {len(text.encode())} bytes (limit {README_LIMIT}): shorten its prose, then "
              "run again", file=sys.stderr)
        return 1
    readme.write_text(text)
    (REPO / "docs/study/results_summary.md").write_text(summary_page(table, verdicts, results))
    print(table + "\n\n" + verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
