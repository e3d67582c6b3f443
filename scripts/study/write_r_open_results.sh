#!/usr/bin/env bash
# Regenerates docs/study/results_r_open.md from the archived results (report-only): the teacher and
# pre-check sections (fixed text), then the arms' table, the pre-registered comparisons (content match;
# lists set-F1 beside it) and the teacher-error copying, from docs/study/r_open/arms/.
cd "$(dirname "$0")/../.."  # the repository root
scripts/in_env.sh python benchmarks/vlsi_study.py --teacher runs/ropen/teacher/final --student-init random \
  --test-data runs/ropen/test.json --extra-test val=runs/ropen/val.json --source labels=runs/ropen/labelled.json \
  --source teacher=runs/ropen/pool_teacher.json --source true=runs/ropen/pool_true.json --out runs/ropen/report \
  --archive docs/study/r_open/arms --budget 6000 --lr 1e-3 --batch-size 32 --max-length 128 --verbalize-steps 200 \
  --seeds 0,1,2,3,4,5 --rows teacher,sft_labels,sft_pseudo,final_kd_t1,vlsi_pool --teacher-targets 0,1,2,3 \
  --open-forms --max-new-tokens 64 --report-only > /dev/null 2>&1 || {
  echo "the report run failed: rerun it without its redirections to see why" >&2; exit 1; }
{
  cat <<'HDR'
# R-open: answers with many valid forms (issue 19; complete at the pre-registered 5 paired seeds)

The regime, its generator and its thresholds: `docs/study/preregistration.md` (R-open paragraph,
amendments 2-5). Data: the R-unlabelled sets rewritten by `vlsi data open-forms` (labelled
`--seed 300`, pool with true labels `--seed 301`, validation `302`, test `303`).

## The R-open teacher

The shipped student fine-tuned on the open-form pool (true labels) + labelled set, 3,000 steps,
batch 32, lr 2e-4 (`vlsi train --config docs/study/ropen_teacher.yaml --threads 1`, 26 min on one
thread, final loss 0.417). Content match (`vlsi eval --open-forms --max-new-tokens 64`,
`r_open/teacher_eval.json`):

| split | content match | caption set-F1 | attribute | caption | compare | count | exist | spatial |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| test (5,146) | **0.822** | 0.926 | 0.703 | 0.753 | 0.969 | 0.914 | 1.000 | 0.508 |
| validation (1,710) | 0.811 | 0.941 | | | | | | |

(Exact match, which counts only the one form the reference happens to use, is 0.615 on test.)

**Teacher v2 (amendment 5).** Trained again from the same recipe and data on a machine of another
CPU type (2026-12-06), the teacher answered 185 of the 5,146 test questions differently: float
rounding, amplified over 3,000 steps. v1's weights were not kept, so this build (v2) is kept in the
repository (`docs/study/r_open/teacher_v2/`, copied by `prepare_inputs.sh`) and used by every row
from R-open seed 3 on (seeds 3-5); each seed's teacher-using arms share one build.
Test content match **0.821** (set-F1 0.926; attribute 0.704, caption 0.754, compare 0.969, count
0.912, exist 1.000, spatial 0.502), validation 0.8117 (`r_open/teacher_v2_eval/teacher/all.json`).

## Pre-check (amendment 3): held

`python benchmarks/teacher_confidence.py --model runs/ropen/teacher/final --data
runs/ropen/pool_true.json --samples 512 --seed 0 --threads 1` (`r_open/precheck.json`):

| model | mean entropy (nats) | cross-entropy vs the data | top token = data's | forms' bound |
|---|---:|---:|---:|---:|
| R-open teacher | **0.419** | 0.390 | 0.815 | 0.347 |
| shipped student (never saw the forms; for contrast) | 0.400 | 14.34 | 0.098 | 0.347 |

Threshold >= 0.25 nats (amendment 3): **held** (0.419). Under amendment 2's first threshold
(0.45), lowered before this measurement because no teacher could reach it with this tokenizer, it
would not have. The teacher's entropy exceeds the forms' own bound because it is also unsure of
content (its errors), and its cross-entropy (0.390) sits close to that bound: it learned the
forms' spread. The contrast row is the warning: a model that never saw the forms is as "wide"
(0.400) out of confusion (cross-entropy 14.3): entropy alone does not make a teacher worth
distilling; the two figures have to be read together.

## Teacher labels on the pool (A2's data)

`vlsi label --teacher runs/ropen/teacher/final --data runs/rstudy/pool/pool_questions.json --out
runs/ropen/pool_teacher.json --threads 1`: 94,298 questions in 483 s (118 q/s, one thread, load
~3); 2 distinct answers (10 records) hit the 64-token limit (degenerate repetitions, marked
`truncated`). Agreement with the pool's true answers by content: **0.797** (attribute 0.697,
caption 0.761 with set-F1 0.932, compare 0.949, count 0.922, exist 1.000, spatial 0.506): the same
agreement as the R-unlabelled teacher's labels by exact match (0.797). Teacher v2's labels
(`prepare_inputs.sh r_open`, 326 s, 175 q/s; the same 10 truncated): **0.796** (attribute 0.697,
caption 0.759 with set-F1 0.932, compare 0.949, count 0.922, exist 1.000, spatial 0.506).

## The teacher's verbalized intermediate layers (pre-registered report)

`python benchmarks/teacher_confidence.py --model runs/ropen/teacher/final --data runs/ropen/pool_true.json
--samples 512 --seed 0 --threads 1 --verbalizers runs/ropen/study/shared/seed<N>/distill/teacher_verbalizers`
(teacher v2 with the verbalizers VLsI step 1 trained for seeds 3, 4, 5; `r_open/verbalized_entropy_seed<N>.json`;
2.1 min each, load ~4): mean entropy / cross-entropy against the data (nats) / top token = data's, over the
same 512 records as the pre-check; the range over the three seeds' verbalizers.

| teacher layer | entropy | cross-entropy | top = data's |
|---|---:|---:|---:|
| 0 (verbalized) | 0.690-0.712 | 0.864-0.890 | 0.692 |
| 1 (verbalized) | 0.443-0.459 | 0.615-0.631 | 0.785-0.788 |
| 2 (verbalized) | 0.353-0.355 | 0.572-0.586 | 0.799-0.804 |
| 3 (verbalized; the last decoder layer) | 0.255-0.262 | 0.531-0.545 | 0.815 |
| final (the model's own head) | 0.418 | 0.390 | 0.814 |

Every verbalized layer is well above the earlier study's 0.15 nats; entropy falls with depth as
the layers' answers improve. The verbalized last layer is sharper than the model's own head (0.26
against 0.42 nats) and worse calibrated (cross-entropy 0.54 against 0.39): after 200 steps of
verbalization its verb-FFN is overconfident. So the deepest layer-wise target VLsI matches
carries less of the forms' spread than the final layer A3 distils; the shallower ones are wider.

## The arms (A1-A4, seeds 0-5)

Command (two workers, one per core; resumable; finished rows read from the archive): on a fresh
checkout first `scripts/study/prepare_inputs.sh r_open` (rebuilds the sets, copies teacher v2, makes its labels
under runs/ and checks them against the archive answer by answer), then
`STUDY_CODE=<frozen worktree> scripts/study/r_open_driver.sh` (each worker:
`scripts/study/r_open_worker.sh`, the R-unlabelled budget and settings with `--open-forms
--max-new-tokens 64`). The rows keep R-unlabelled's names and group label; the figures are content
match (exact match in the per-seed files). A verdict is given at 5 paired seeds (H2: 8 when the
5-seed difference is under 0.02), before that "open (k of N seeds)". H1 is pre-registered in
R-unlabelled only; its rows below are reported beside H2 by the same test. **The design rule
(teacher >= +0.15 above the label-only arm, mean over seeds) did not hold**: teacher 0.822 (v2
0.821) - A1 0.692 = +0.130, so by the pre-registration this regime is reported as not testing what
it should; the verdicts below stand as measured. Teacher builds (amendment 5):
v1 for seeds 0-1 and seed 2's A2 and VLsI; v2 for seeds 3-5; A1 uses no teacher. Seed 2 has no A3
and seed 5 only A3 and VLsI, so VLsI - A2 pairs seeds 0-4 and VLsI - A3 seeds 0, 1, 3, 4, 5 (and
A3 - A1 can only have 4 pairs: the "open (4 of 5)" below is final). VLsI's mean has 6 seeds; over
seeds 0-4 it is 0.775 ± 0.029.

HDR
  sed -n '3,$p' runs/ropen/report/results.md
} > docs/study/results_r_open.md
cat >> docs/study/results_r_open.md <<'TAIL'

## By teacher build, exact match, H3

- H2's paired differences by teacher build (amendment 5): VLsI - A2 v1 (seeds 0-2) +0.049, v2
  (3-4) +0.016; VLsI - A3 v1 (0-1) +0.072, v2 (3-5) +0.033. Most of VLsI's lead is on the v1 seeds.
- Exact match (reported, not tested; it counts only the form the reference happens to use): A1
  0.493 ± 0.012, A2 0.532 ± 0.018, A3 0.529 ± 0.006, VLsI 0.574 ± 0.031 (6 seeds); teacher 0.615.
- H3 (`r_open/arms/vlsi_pool/matching_stats_seed<N>.json`): order-preserving, early and late, at
  each of the 5 seeds with statistics (1-5; seed 0's were lost with its run folder, so 5 of VLsI's
  6 seeds): **held**. The frequencies are R-unlabelled's (student 1 -> teacher 0 / 1 near 0.5 /
  0.5, 2 -> 2 ~0.75, 3 -> 3 ~0.87): with equal depths (amendment 1) each student target has two
  candidates, so H3 says little about whether the adaptive matching itself helps.
- No oracle runs in R-open (A1-A4 as pre-registered), so the data-limited check was not made here;
  A2 - A1 +0.047 shows the pool's labels help.
- The copying table compares every seed with teacher v1's wrong answers; against each seed's own
  build (v2 for seeds 3-5) the shares are 0.691 (A2), 0.677 (A3), 0.686 (VLsI): the same picture.
TAIL
