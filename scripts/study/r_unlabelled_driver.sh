#!/usr/bin/env bash
# Inputs: scripts/study/prepare_inputs.sh r_unlabelled (on a fresh checkout: runs/ is not in git).
# Usage: STUDY_CODE=/path/to/frozen/worktree START_SEEDS="5 6 7" setsid nohup scripts/study/r_unlabelled_driver.sh &
# R-unlabelled in the pre-registered order: every arm of seed 0, then seed 1, ... (two workers share
# the (row, seed) pairs through the study script's file locks).
cd "$(dirname "$0")/../.."  # the repository root
mkdir -p runs/rstudy/logs
[ -f runs/rstudy/.inputs_checked ] || { echo "inputs not checked: run scripts/study/prepare_inputs.sh r_unlabelled first" >&2; exit 1; }
# Seeds 5-7: the pre-registered extension (A2, A3, A4 only: both 5-seed H2 differences were under 0.02).
for seed in ${START_SEEDS:-0 1 2 3 4 5 6 7}; do
  rows=sft_labels,sft_pseudo,final_kd_t1,vlsi_pool
  [ "$seed" -ge 5 ] && rows=sft_pseudo,final_kd_t1,vlsi_pool
  [ "$seed" -le 1 ] && rows="$rows,oracle"
  [ "$seed" -eq 0 ] && rows="teacher,$rows"
  ROWS=$rows SEEDS=$seed scripts/study/run_two_workers.sh scripts/study/r_unlabelled_worker.sh \
    runs/rstudy/logs/seed${seed} || exit 1
  echo "seed $seed done $(date)" >> runs/rstudy/logs/driver.log
done
