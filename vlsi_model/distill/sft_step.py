"""VLsI step 3: plain SFT of the interacted student; writes the deployable student (`run_sft`).

The objective is `vlsi_model.training.sft.SFTObjective`, the same as `vlsi train`'s; what differs
is the starting point (the student after step 2) and which weights train (see `prepare_trainable`).
"""

from __future__ import annotations

import logging

from vlsi_model.distill.adapters import get_adapter
from vlsi_model.distill.config import FINAL_DIR, INTERACTION_DIR, DistillConfig
from vlsi_model.distill.steps_common import (
    free_memory,
    load_dataset,
    load_model,
    merged,
    prepare_trainable,
    process_state,
    publish_output,
    require_output,
    skip_or_refuse,
)

log = logging.getLogger(__name__)


def run_sft(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 3: plain SFT of the interacted student; writes the deployable student to final/."""
    from vlsi_model.models import save_model_dir
    from vlsi_model.training.dataset import make_collate_fn
    from vlsi_model.training.sft import SFTObjective
    from vlsi_model.training.trainer import train

    out = cfg.out
    dest = out / FINAL_DIR
    if skip_or_refuse(dest, resume, "sft"):
        return
    src = out / INTERACTION_DIR
    require_output(src, "the interacted student", "sft")
    state = process_state()
    tc = cfg.train_config("sft", "sft")
    student, tokenizer, image_processor = load_model(src, cfg.student.dtype)
    dataset = load_dataset(cfg, tokenizer, image_processor)
    model, is_peft = prepare_trainable(student, get_adapter(student), cfg.lora, "sft", tc.seed)
    if cfg.student.freeze_vision and not is_peft:
        from vlsi_model.models import freeze_vision

        freeze_vision(model)
    result = train(SFTObjective(model), dataset, make_collate_fn(int(tokenizer.pad_token_id)), tc, resume=resume,
                   progress_desc="sft", force_resume=force_resume)
    log.info("sft: %d steps, final loss %.4f", result.steps, result.final_loss)
    state.wait_for_everyone()
    final_model = merged(model, is_peft)
    if state.is_main_process:
        publish_output(dest, lambda p: save_model_dir(
            final_model.eval(), tokenizer, image_processor, p,
            metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "sft", "teacher": str(cfg.teacher.path),
                      "steps": result.steps, "final_loss": result.final_loss},
        ))
    state.wait_for_everyone()
    free_memory(student, model, final_model)
