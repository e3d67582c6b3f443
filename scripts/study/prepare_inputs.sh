#!/usr/bin/env bash
# Usage: scripts/study/prepare_inputs.sh r_open|r_unlabelled [...]
# Rebuilds the pre-registered study's inputs under runs/ from nothing (docs/study/preregistration.md,
# "Data" and amendments 2-4): the seeded synthetic sets, the pool's questions, the R-open forms, the
# R-open teacher and each regime's teacher labels. Every step is skipped when its output exists, so a
# killed run is restarted by running it again. Then scripts/study/check_inputs.py checks the rebuilt
# test and validation sets, and the R-open teacher, against the archived results (answer by answer):
# the rows a later session adds must see the inputs the archived rows saw.
#
# Why a script: runs/ does not survive a fresh checkout, and the study proceeds over many sessions.
# Cost on one core: the sets ~5 min, the R-open teacher 26 min, each regime's pool labels 8-14 min.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
run() { echo "+ $*" >&2; scripts/in_env.sh "$@"; }
[ $# -gt 0 ] || { echo "usage: $0 r_open|r_unlabelled [...]" >&2; exit 2; }

# --- shared by both regimes: the R-unlabelled sets (preregistration, "Data") ---
[ -f runs/rstudy/labelled/train_mix.json ] || run python -m vlsi_model.recipes.nano data --out runs/rstudy/labelled \
  --num 500 --caption-num 500 --seed 100
[ -f runs/rstudy/pool/train_mix.json ] || run python -m vlsi_model.recipes.nano data --out runs/rstudy/pool \
  --num 10000 --caption-num 10000 --seed 200
[ -f runs/rstudy/pool/pool_questions.json ] || run python scripts/study/strip_answers.py \
  runs/rstudy/pool/train_mix.json runs/rstudy/pool/pool_questions.json
families=attribute,count,exist,spatial,compare,caption
[ -f runs/rstudy/test/test.json ] || run vlsi data scenes --out runs/rstudy/test --num 900 --split test \
  --layout grid --families "$families" --no-progress
[ -f runs/rstudy/val/val.json ] || run vlsi data scenes --out runs/rstudy/val --num 300 --split val \
  --layout grid --families "$families" --no-progress

for regime in "$@"; do
  case "$regime" in
    r_unlabelled)
      [ -f runs/rstudy/pool/pool_teacher.json ] || run vlsi label --teacher vlsi_model/assets/default_student \
        --data runs/rstudy/pool/pool_questions.json --out runs/rstudy/pool/pool_teacher.json --threads 1 --no-progress
      ;;
    r_open)  # amendment 2: the same sets in open forms, the R-open teacher, its labels on the pool
      for pair in labelled:runs/rstudy/labelled/train_mix.json:300 pool_true:runs/rstudy/pool/train_mix.json:301 \
                  val:runs/rstudy/val/val.json:302 test:runs/rstudy/test/test.json:303; do
        IFS=: read -r name src seed <<< "$pair"
        [ -f "runs/ropen/$name.json" ] || run vlsi data open-forms "$src" --out "runs/ropen/$name.json" --seed "$seed"
      done
      [ -f runs/ropen/teacher/final/model.safetensors ] || run vlsi train --config docs/study/ropen_teacher.yaml \
        --threads 1 --resume
      [ -f runs/ropen/pool_teacher.json ] || run vlsi label --teacher runs/ropen/teacher/final \
        --data runs/rstudy/pool/pool_questions.json --out runs/ropen/pool_teacher.json --threads 1 --no-progress
      ;;
    *) echo "unknown regime $regime (r_open, r_unlabelled)" >&2; exit 2 ;;
  esac
done
run python scripts/study/check_inputs.py "$@"
