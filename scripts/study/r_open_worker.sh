#!/usr/bin/env bash
# One R-open (preregistration amendments 2-4) study worker (rows and seeds from ROWS / SEEDS). STUDY_CODE: a frozen worktree
# of the code (`git worktree add --detach DIR COMMIT`, with DIR/runs a link to this repo's runs/),
# so edits here cannot reach a running study; results are archived in this repo's docs/study/.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${STUDY_CODE:-$REPO}"  # a frozen worktree of the code (git worktree add), so edits cannot reach a running study
ROWS=${ROWS:-sft_labels}
SEEDS=${SEEDS:-0}
exec nice -n 5 "$REPO/.venv/bin/python" benchmarks/vlsi_study.py --teacher runs/ropen/teacher/final \
  --student-init random --test-data runs/ropen/test.json --extra-test val=runs/ropen/val.json \
  --source labels=runs/ropen/labelled.json --source teacher=runs/ropen/pool_teacher.json \
  --source true=runs/ropen/pool_true.json --out runs/ropen/study --archive "$REPO"/docs/study/r_open/arms \
  --budget 6000 --lr 1e-3 --batch-size 32 --max-length 128 --verbalize-steps 200 --threads 1 \
  --seeds "$SEEDS" --rows "$ROWS" --teacher-targets 0,1,2,3 --open-forms --max-new-tokens 64
