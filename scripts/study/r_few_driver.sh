#!/usr/bin/env bash
# Inputs: scripts/study/prepare_inputs.sh r_unlabelled (on a fresh checkout: runs/ is not in git).
# Usage: STUDY_CODE=/path/to/frozen/worktree setsid nohup scripts/study/r_few_driver.sh &
# R-few and R-unlabelled's remaining arms, pre-registered last (after R-open): A3 and A4 on the 500
# labelled frames alone (final_kd_few, vlsi_few), then final-layer KD at T=2 (final_kd_t2) and VLsI
# with the paper's plain verbalizer (vlsi_plain) on the pool, seeds 0-4, two workers sharing rows
# through file locks. STUDY_CODE: a worktree of the R-unlabelled code (a8aeef1) with these rows
# (681a42f cherry-picked), so every R-unlabelled arm runs the same code. A1 is R-unlabelled's sft_labels (the same run); its
# train-vs-test gap is the `train` column of a separate report run of benchmarks/vlsi_study.py with
# `--rows sft_labels --extra-test train=runs/rstudy/labelled/train_mix.json`, which scores the
# rows' kept models (done 2026-12-05, in docs/study/r_unlabelled/sft_labels/); the R-few arms' own
# `train` scores come from the worker (it adds that extra test when every row it runs is R-few's).
cd "$(dirname "$0")/../.."  # the repository root
mkdir -p runs/rstudy/logs
[ -f runs/rstudy/.inputs_checked ] || { echo "inputs not checked: run scripts/study/prepare_inputs.sh r_unlabelled first" >&2; exit 1; }
while pgrep -f "r_unlabelled_driver.sh|r_open_driver.sh" > /dev/null; do sleep 60; done
for seed in 0 1 2 3 4; do
  # R-few's two arms, then the pool arms (apart: the worker scores R-few's on their training set)
  for rows in final_kd_few,vlsi_few final_kd_t2,vlsi_plain; do
    ROWS=$rows SEEDS=$seed scripts/study/run_two_workers.sh scripts/study/r_unlabelled_worker.sh \
      runs/rstudy/logs/few_seed${seed}_${rows%%,*} || exit 1
  done
  echo "R-few seed $seed done $(date)" >> runs/rstudy/logs/driver.log
done
