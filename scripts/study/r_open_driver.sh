#!/usr/bin/env bash
# Inputs: scripts/study/prepare_inputs.sh r_open (on a fresh checkout: runs/ is not in git).
# Usage: STUDY_CODE=/path/to/frozen/worktree START_SEEDS="3 4 5" setsid nohup scripts/study/r_open_driver.sh &
# R-open after R-unlabelled (the pre-registered order): waits for the R-unlabelled driver, then
# seeds 0-5 of A1-A4 (+ the teacher row at seed 0), two workers sharing rows through file locks.
# Amendment 5 (teacher v2): seed 2 runs no A3 (its other arms used teacher v1), and seed 5 only A3
# and VLsI (VLsI - A3's fifth pair). Rows already archived are read from the archive, not rerun.
cd "$(dirname "$0")/../.."  # the repository root
[ -f runs/ropen/.inputs_checked ] || { echo "inputs not checked: run scripts/study/prepare_inputs.sh r_open first" >&2; exit 1; }
mkdir -p runs/ropen/logs
while pgrep -f r_unlabelled_driver.sh > /dev/null; do sleep 60; done
for seed in ${START_SEEDS:-0 1 2 3 4 5}; do
  case "$seed" in
    0) rows=teacher,sft_labels,sft_pseudo,final_kd_t1,vlsi_pool ;;
    2) rows=sft_labels,sft_pseudo,vlsi_pool ;;
    5) rows=final_kd_t1,vlsi_pool ;;
    *) rows=sft_labels,sft_pseudo,final_kd_t1,vlsi_pool ;;
  esac
  ROWS=$rows SEEDS=$seed scripts/study/run_two_workers.sh scripts/study/r_open_worker.sh \
    runs/ropen/logs/seed${seed} || exit 1
  echo "seed $seed done $(date)" >> runs/ropen/logs/driver.log
done
