"""VLsI step 1, verbalization: train each model's verb-FFNs with its backbone frozen (`run_verbalize`).

The VLsI training steps as objectives for the generic trainer (`vlsi_model.training.trainer.train`).

An objective is an `nn.Module` whose `forward(batch)` returns `{"loss": scalar tensor,
**scalar metrics}` (detached tensors or floats, so no device sync per step); the trainer
optimises exactly the parameters with `requires_grad`, so each objective's constructor
sets which parameters train:

- `VerbalizationObjective` (step 1): the whole backbone (LM head and final norm included)
  is frozen, only the verb-FFNs train, each with the next-token cross-entropy of its own
  verbalized distribution on the response tokens. The per-layer losses are summed: the
  verbalizers share no parameters, so the sum gives every verb-FFN exactly the gradient of
  its own loss (one independent loss per target layer) and a single backward pass.
  The backbone runs under `no_grad` (nothing below the verbalizers needs gradients).

Frozen sub-models are kept in eval mode even when the trainer calls `.train()` on the
objective, so they behave identically in every step (no dropout).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlsi_model.distill.adapters import BackboneAdapter, get_adapter
from vlsi_model.distill.config import STUDENT_VERBALIZED_DIR, TEACHER_VERBALIZERS_DIR, DistillConfig, TargetSpec
from vlsi_model.distill.losses import gather_positions, mean_next_token_ce, next_token_targets, response_positions
from vlsi_model.distill.steps_common import (
    check_same_tokenizer,
    check_targets,
    free_memory,
    freeze,
    is_complete,
    load_dataset,
    load_model,
    new_verbalizers,
    process_state,
    publish_output,
    skip_or_refuse,
    target_layers_of,
    verbalized_heads,
)
from vlsi_model.distill.verbalizer import Verbalizers, save_verbalizers, verbalizer_dir

log = logging.getLogger(__name__)


class VerbalizationObjective(nn.Module):
    """Step 1: train one model's verb-FFNs with next-token CE on response tokens (backbone frozen)."""

    def __init__(
        self,
        model: nn.Module,
        verbalizers: Verbalizers,
        adapter: BackboneAdapter | None = None,
        chunk_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.adapter = adapter or get_adapter(model)
        check_targets(model, self.adapter, verbalizers, "model")
        freeze(model)
        self.model = model
        self.verbalizers = verbalizers
        for p in verbalizers.parameters():
            p.requires_grad_(True)
        self.chunk_tokens = int(chunk_tokens)
        self._heads = verbalized_heads(model, self.adapter, verbalizers)  # plain dict: not registered twice

    def train(self, mode: bool = True) -> VerbalizationObjective:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        labels = batch["labels"]
        mask = response_positions(labels)
        targets = next_token_targets(labels, mask)
        with torch.no_grad():
            hs = self.adapter.forward_with_hidden_states(self.model, batch, self.verbalizers.target_layers)
        losses: list[torch.Tensor] = []
        metrics: dict[str, Any] = {}
        for t in self.verbalizers.target_layers:
            hidden = gather_positions(hs.layers[t], mask)
            ce = mean_next_token_ce(hidden, self._heads[t], targets.to(hidden.device), self.chunk_tokens)
            losses.append(ce)
            metrics[f"ce_L{t}"] = ce.detach()
        loss = torch.stack(losses).sum()
        metrics["ce_mean"] = loss.detach() / len(losses)
        metrics["num_tokens"] = float(targets.numel())
        return {"loss": loss, **metrics}


def _verbalize_one(
    cfg: DistillConfig, model: nn.Module, dataset: Any, pad_id: int, spec: TargetSpec, who: str, resume: bool,
    force_resume: bool,
) -> Verbalizers:
    from vlsi_model.training.dataset import make_collate_fn
    from vlsi_model.training.trainer import train

    adapter = get_adapter(model)
    targets = target_layers_of(spec, adapter.num_layers(model), who)
    tc = cfg.train_config("verbalize", f"verbalize_{who}")
    verbs = new_verbalizers(adapter.hidden_size(model), targets, cfg.verbalizers.residual, tc.seed)
    objective = VerbalizationObjective(model, verbs, adapter, chunk_tokens=cfg.verbalizers.chunk_tokens)
    result = train(objective, dataset, make_collate_fn(pad_id), tc, resume=resume, progress_desc=f"verbalize {who}",
                   force_resume=force_resume)
    log.info("verbalized %s layers %s: %d steps, final loss %.4f", who, targets, result.steps, result.final_loss)
    return verbs.eval()


def run_verbalize(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 1: train the teacher's and the student's verb-FFNs (backbones frozen), each on its own."""
    from vlsi_model.models import save_model_dir

    state = process_state()
    out = cfg.out
    t_dest, s_dest = out / TEACHER_VERBALIZERS_DIR, out / STUDENT_VERBALIZED_DIR
    if is_complete(t_dest) and is_complete(s_dest) and resume:
        log.info("verbalize: %s and %s are complete, skipping", t_dest, s_dest)
        return
    student, tokenizer, image_processor = load_model(cfg.student.path, cfg.student.dtype)
    dataset = load_dataset(cfg, tokenizer, image_processor)
    pad_id = int(tokenizer.pad_token_id)
    if not skip_or_refuse(t_dest, resume, "verbalize (teacher)"):
        teacher, t_tokenizer, _ = load_model(cfg.teacher.path, cfg.teacher.dtype)
        check_same_tokenizer(t_tokenizer, tokenizer)
        verbs = _verbalize_one(cfg, teacher, dataset, pad_id, cfg.verbalizers.teacher, "teacher", resume,
                               force_resume)
        model_type = get_adapter(teacher).model_type
        if state.is_main_process:
            publish_output(t_dest, lambda p: save_verbalizers(verbs, p, model_type=model_type,
                                                        extra={"source_model": str(cfg.teacher.path)}))
        state.wait_for_everyone()
        free_memory(teacher, verbs)
    if not skip_or_refuse(s_dest, resume, "verbalize (student)"):
        verbs = _verbalize_one(cfg, student, dataset, pad_id, cfg.verbalizers.student, "student", resume,
                               force_resume)
        model_type = get_adapter(student).model_type

        def build(p: Path) -> None:
            save_model_dir(student, tokenizer, image_processor, p,
                           metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "verbalize",
                                     "source_model": str(cfg.student.path)})
            save_verbalizers(verbs, verbalizer_dir(p), model_type=model_type)

        if state.is_main_process:
            publish_output(s_dest, build)
        state.wait_for_everyone()
