#!/usr/bin/env bash
# One R-unlabelled study worker (rows and seeds from ROWS / SEEDS). STUDY_CODE: a frozen worktree
# of the code (`git worktree add --detach DIR COMMIT`, with DIR/runs a link to this repo's runs/),
# so edits here cannot reach a running study; results are archived in this repo's docs/study/.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${STUDY_CODE:-$REPO}"  # a frozen worktree of the code (git worktree add), so edits cannot reach a running study
ROWS=${ROWS:-sft_labels,oracle}
SEEDS=${SEEDS:-0}
SOURCES="--source labels=runs/rstudy/labelled/train_mix.json --source true=runs/rstudy/pool/train_mix.json"
[ -f runs/rstudy/pool/pool_teacher.json ] && SOURCES="$SOURCES --source teacher=runs/rstudy/pool/pool_teacher.json"
# R-few's arms (ROWS all *_few) are also scored on their own labelled training questions: the
# pre-registered train-vs-test gap (the pool-trained arms are not: their training set is another)
if ! tr ',' '\n' <<< "$ROWS" | grep -qv '_few$'; then
  SOURCES="$SOURCES --extra-test train=runs/rstudy/labelled/train_mix.json"
fi
exec nice -n 5 "$REPO/.venv/bin/python" benchmarks/vlsi_study.py --teacher vlsi_model/assets/default_student \
  --student-init random --test-data runs/rstudy/test/test.json --extra-test val=runs/rstudy/val/val.json \
  $SOURCES --out runs/rstudy/study --archive "$REPO"/docs/study/r_unlabelled --budget 6000 --lr 1e-3 --batch-size 32 \
  --max-length 128 --verbalize-steps 200 --threads 1 --seeds "$SEEDS" --rows "$ROWS" --teacher-targets 0,1,2,3
