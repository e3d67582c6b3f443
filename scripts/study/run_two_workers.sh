#!/usr/bin/env bash
# Usage: ROWS=<rows> SEEDS=<seeds> scripts/study/run_two_workers.sh WORKER LOG_PREFIX
# Two copies of a study worker (r_unlabelled_worker.sh, r_open_worker.sh) on the same rows and
# seeds, one per core: they share the (row, seed) pairs through the study script's file locks.
# Waits for both; exits 1 when either fails, so a driver stops instead of going on to later seeds.
worker=$1 log=$2
"$worker" > "${log}_a.log" 2>&1 &
a=$!
sleep "${WORKER_STAGGER_S:-30}"  # the first takes its row's lock before the second looks
"$worker" > "${log}_b.log" 2>&1 &
b=$!
wait "$a"; rc_a=$?
wait "$b"; rc_b=$?
if [ "$rc_a" -ne 0 ] || [ "$rc_b" -ne 0 ]; then
  echo "$(date -u +%T) rows $ROWS seeds $SEEDS: a worker failed (rc $rc_a / $rc_b): ${log}_a.log, ${log}_b.log" >&2
  exit 1
fi
