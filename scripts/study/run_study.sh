#!/usr/bin/env bash
# The whole pre-registered study (issue 19, docs/study/preregistration.md) in its pre-registered
# order, then every report made from it:
#
#   setsid nohup scripts/study/run_study.sh > runs/study.log 2>&1 &
#
# 1. the inputs of both regimes, rebuilt from nothing and checked against the archive
#    (prepare_inputs.sh; ~8 min the first time, then only its check, a few minutes);
# 2. R-unlabelled (A1-A4 at seeds 0-4, the oracle at 0-1, A2-A4 at the extension seeds 5-7), R-open
#    (A1-A4), then R-few and R-unlabelled's A3b / A5: each driver runs two workers, one per core;
# 3. docs/study/results_r_unlabelled.md, results_r_open.md, results_summary.md and the README's table.
#
# Resumable at every level: a (row, seed) already archived under docs/study/ is read, not rerun, and
# a killed row resumes from its last checkpoint; once every row is archived it only rebuilds the
# inputs and the reports (until then it trains the missing rows). A worker that fails stops it.
# A fresh study: point the workers' --archive elsewhere. Cost of the
# full grid from nothing: ~75 rows of 35-55 min on one core, two at a time: 1-1.5 days on 2 cores;
# a GPU runs it unchanged. STUDY_CODE (optional): a frozen worktree of the code for the rows
# (`git worktree add --detach DIR COMMIT`, DIR/runs linked to this repo's runs/), so edits made
# while the study runs cannot reach it (the archived R-unlabelled and R-few rows ran a8aeef1, + 681a42f
# for the rows run last).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
scripts/study/prepare_inputs.sh r_unlabelled r_open
scripts/study/r_unlabelled_driver.sh
scripts/study/r_open_driver.sh
scripts/study/r_few_driver.sh
bash scripts/study/write_r_unlabelled_results.sh
bash scripts/study/write_r_open_results.sh
scripts/in_env.sh python scripts/study/write_summary.py
