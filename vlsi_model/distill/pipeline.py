"""The three VLsI steps end to end (`vlsi distill`): verbalize, interact, SFT, in order, resumable.

One file per step: `verbalization.py` (step 1), `interaction.py` (step 2, with `matching.py`),
`sft_step.py` (step 3); the config and output layout: `config.py`; what the steps share:
`steps_common.py`. Outputs are published complete or not at all, so with `resume` completed
steps are skipped and an interrupted one continues from its newest trainer checkpoint
(exactly); without `resume`, an existing output is an error rather than silently overwritten.

Choices the paper leaves open (ours, documented):
- Both models see the student's image processor: teacher and student must produce the
  same token sequence (same number of image tokens) for their per-token distributions to
  be compared position by position.
- LoRA goes on the decoder layers' linear layers only (`target_modules` names matched
  inside the decoder layers, never the vision tower, whose Qwen2.5-VL MLP uses the same
  names). By default only the interaction step uses LoRA (the paper's r = alpha = 64);
  `lora.steps: [interact, sft]` uses it for SFT too. Adapters are merged
  (`merge_and_unload`) before each step's output is written.
- Full fine-tuning (`lora.enabled: false`) in the interaction step trains the decoder
  layers (not the vision tower, embeddings, final norm or LM head: the verbalizers share
  the latter two; `student.interact_trains: language_model` trains those three too, for a
  student that starts from a random init); in the SFT step it trains every weight, like `vlsi train`, except the
  vision encoder with `student.freeze_vision: true` (for students trained on a frozen one).
- The verbalizers' initial weights (and LoRA's) are seeded by `train.seed`, so a run is
  reproducible and a resumed run equals an uninterrupted one.
- With several processes, each records its own matches (runs/interact/matches_rank<r>.jsonl);
  the statistics merge all of them. The teacher cache is built by the main process alone,
  on its device, before training starts (the others wait).
- DDP: with `loss.last_op: none`, decoder layers above the deepest student target get no
  gradient; set `train.find_unused_parameters: true` then.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlsi_model.distill.config import (
    CONFIG_COPY,
    FINAL_DIR,
    INTERACTION_DIR,
    STUDENT_VERBALIZED_DIR,
    DistillConfig,
    load_distill_config,
    parse_steps,
)
from vlsi_model.distill.interaction import run_interact
from vlsi_model.distill.sft_step import run_sft
from vlsi_model.distill.steps_common import process_state
from vlsi_model.distill.verbalization import run_verbalize
from vlsi_model.training.config import save_yaml

STEP_FUNCTIONS: dict[str, Callable[[DistillConfig, bool, bool], None]] = {
    "verbalize": run_verbalize,
    "interact": run_interact,
    "sft": run_sft,
}


def run_distill(
    config: str | os.PathLike[str] | Mapping[str, Any] | DistillConfig,
    steps: Sequence[str] | str | None = None,
    resume: bool = False,
    force_resume: bool = False,
) -> dict[str, Path]:
    """Run the selected steps in order; returns {step: its output directory}.

    Writes output_dir/distill_config.yaml (the resolved config) first.
    """
    cfg = config if isinstance(config, DistillConfig) else load_distill_config(config)
    selected = parse_steps(steps)
    state = process_state()
    if state.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg.to_dict(), cfg.out / CONFIG_COPY)
    outputs = {
        "verbalize": cfg.out / STUDENT_VERBALIZED_DIR,
        "interact": cfg.out / INTERACTION_DIR,
        "sft": cfg.out / FINAL_DIR,
    }
    for step in selected:
        STEP_FUNCTIONS[step](cfg, resume, force_resume)
    return {step: outputs[step] for step in selected}
