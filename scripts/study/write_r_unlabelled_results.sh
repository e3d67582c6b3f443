#!/usr/bin/env bash
# Regenerates docs/study/results_r_unlabelled.md from the archived results (report-only).
cd "$(dirname "$0")/../.."  # the repository root
scripts/in_env.sh python benchmarks/vlsi_study.py --teacher vlsi_model/assets/default_student --student-init random \
  --test-data runs/rstudy/test/test.json --extra-test val=runs/rstudy/val/val.json \
  --source labels=runs/rstudy/labelled/train_mix.json --source true=runs/rstudy/pool/train_mix.json \
  --source teacher=runs/rstudy/pool/pool_teacher.json --out runs/rstudy/report --archive docs/study/r_unlabelled \
  --budget 6000 --lr 1e-3 --batch-size 32 --max-length 128 --verbalize-steps 200 --seeds 0,1,2,3,4,5,6,7 \
  --rows teacher,sft_labels,sft_pseudo,final_kd_t1,vlsi_pool,oracle,final_kd_few,vlsi_few,final_kd_t2,vlsi_plain \
  --teacher-targets 0,1,2,3 --report-only > /dev/null 2>&1 || {
  echo "the report run failed: rerun it without its redirections to see why" >&2; exit 1; }
{
  cat <<'HDR'
# R-unlabelled: 500 labelled frames + 20,000 frames the teacher labelled (issue 19; complete)

Pre-registered in `docs/study/preregistration.md` (commit `a273fc2`, before any run; amendment 1,
`95e7eb4`, before any distillation run). Regime: a fresh random nano student per seed (frozen
random vision encoder), 6,000 optimizer steps per arm, batch 32, lr 1e-3; teacher the shipped
student (0.832 on this test split); labelled set 500 VQA + 500 caption frames (4,676 records);
pool 20,000 frames (94,298 questions) labelled by the teacher (0.797 agreement with the true
labels); test 5,146 questions (test-split seeds), validation 1,710. Distillation arms: 3,000
interaction + 3,000 SFT steps, interaction trains the whole language model; verbalized targets
student 1-3, teacher 0-3. Results per (arm, seed) are in `docs/study/r_unlabelled/`.

Hypotheses as pre-registered: **H1** each teacher-labelled arm beats SFT on the labels by >= 0.05
(paired mean, 95% interval above 0); **H2** VLsI beats sequence-level KD and final-layer KD by
>= 0.01 (paired mean, 95% interval above 0); **H3** the matching stays order-preserving;
data-limited check: oracle - SFT on labels >= 0.10 (pre-registered on validation at seed 0: +0.157,
held; seed 1 on validation +0.117; the table below pairs the seeds on the test split, where seed 1
gives +0.094).
Seed 2's "train min" includes ~13 minutes in which its workers were paused (SIGSTOP) for
quiet-machine benchmarks. A verdict is given at the pre-registered number of seeds (5 for the arms, 2 for the oracle);
before that the table says "open (k of N seeds)" with the direction of the interim interval. Both
H2 differences were under 0.02 at 5 seeds, so A2, A3 and A4 ran the 3 pre-registered extra seeds
(5-7; A1 and the oracle keep 5 and 2): H2's verdict is at 8 paired seeds, H1's at 5.
R-few's teacher arms (A3 / A4 on the 500 labelled frames alone; R-few's A1 is the `sft_labels` row;
complete at 5 seeds, no hypothesis pre-registered: their paired differences are in
`results_summary.md`) and R-unlabelled's A3b (T = 2) and A5 (plain verbalizer), run last as
pre-registered, join the same table as their seeds come in (code: a8aeef1 + 681a42f, the
R-unlabelled rows' code; `scripts/study/r_few_driver.sh`). The "train (set)" column is an arm's accuracy on its own 4,676
labelled training questions, from the model its row kept: R-few's pre-registered train-vs-test gap
(A1 scored 2026-12-05; the R-few arms by the worker, `--extra-test train=...`).
The table's "data-limited (test)" row is that check on the test split with an interval test, which
the pre-registration did not set ("did not hold": +0.118, interval [-0.176, +0.411] at 2 seeds); the pre-registered
check is seed 0 on validation, >= 0.10: +0.157, held. The teacher-margin design rule (+0.15 over
the label-only arm A1): +0.236, held; over the oracle, trained on the pool's true labels the regime
does not have and read as the ceiling reference rather than a label-only arm, +0.140.

Command (two workers, one per core; resumable; finished rows read from the archive):
`python benchmarks/vlsi_study.py --teacher vlsi_model/assets/default_student --student-init random
--test-data runs/rstudy/test/test.json --extra-test val=runs/rstudy/val/val.json --source
labels=runs/rstudy/labelled/train_mix.json --source true=runs/rstudy/pool/train_mix.json --source
teacher=runs/rstudy/pool/pool_teacher.json --out runs/rstudy/study --archive docs/study/r_unlabelled
--budget 6000 --lr 1e-3 --batch-size 32 --max-length 128 --verbalize-steps 200 --threads 1
--teacher-targets 0,1,2,3 --seeds 0,1,2,3,4 --rows sft_labels,sft_pseudo,final_kd_t1,vlsi_pool,oracle`,
then `--seeds 5,6,7 --rows sft_pseudo,final_kd_t1,vlsi_pool` (`scripts/study/r_unlabelled_driver.sh`)
(data: `python -m vlsi_model.recipes.nano data --out runs/rstudy/labelled --num 500 --caption-num 500
--seed 100`, the pool the same with `--num 10000 --caption-num 10000 --seed 200` and its answers
removed, `vlsi label --teacher vlsi_model/assets/default_student --data pool_questions.json --out
pool_teacher.json`; test / val: `vlsi data scenes --split test --num 900` / `--split val --num 300`,
grid layout, families attribute,count,exist,spatial,compare,caption).

HDR
  sed -n '3,$p' runs/rstudy/report/results.md
} > docs/study/results_r_unlabelled.md
cat >> docs/study/results_r_unlabelled.md <<'H3'

## H3: matching (seeds 0-7, `matching_heatmap_r_unlabelled.png`, `r_unlabelled/vlsi_pool/matching_stats_seed{0,...,7}.json`)

Match frequencies student target -> teacher target, early then late in the interaction step, seed 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7:
student 1 -> teacher 0 / 1: 0.52 / 0.48 then 0.49 / 0.51 | 0.49 / 0.51 then 0.51 / 0.49 | 0.50 / 0.50 then 0.49 / 0.51 | 0.51 / 0.49 then 0.49 / 0.51 | 0.50 / 0.50 then 0.52 / 0.48 | 0.50 / 0.50 then 0.51 / 0.49 | 0.52 / 0.48 then 0.51 / 0.49 | 0.51 / 0.49 then 0.49 / 0.51;
student 2 -> teacher 2: 0.74 then 0.74 | 0.76 then 0.74 | 0.74 then 0.77 | 0.74 then 0.75 | 0.76 then 0.74 | 0.74 then 0.73 | 0.73 then 0.75 | 0.76 then 0.75 (the rest teacher 1);
student 3 -> teacher 3: 0.87 then 0.87 | 0.87 then 0.87 | 0.87 then 0.88 | 0.87 then 0.87 | 0.88 then 0.87 | 0.87 then 0.88 | 0.87 then 0.87 | 0.88 then 0.87 (the rest teacher 2).
The modal teacher target never decreases with the student target, early and late: order-preserving
(held at all eight seeds). For student targets 2 and 3 it does not change between early and late
training; for target 1 the two candidates stay near 0.50 / 0.50 and the mode flips between them, in
both directions, so there is no drift to deeper layers. The frequencies
are the same to ~0.02 across seeds and phases: with S = 3 and T = 4 (amendment 1) the
order-preserving window leaves each student target two candidates, and the matching barely moves
within them, so this regime says little about whether the adaptive matching itself helps.
H3
