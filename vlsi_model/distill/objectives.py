"""The VLsI training steps as objectives for the generic trainer (`vlsi_model.training.trainer.train`).

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
- `InteractionObjective` (step 2): the teacher and its verbalizers are frozen (or replaced
  by a `TeacherCache`); the student's decoder trains as the caller set it up (LoRA
  adapters or all weights), together with its verb-FFNs. The student's final norm and LM
  head are frozen by default (`freeze_student_head`): the verbalizers were fitted against
  them in step 1 and share them. Loss = intermediate_weight * sum over student targets of
  the divergence to the matched teacher target + last_weight * the divergence of the final
  outputs; no ground-truth CE. Gradients flow only through the sampled pairs. The matrix
  of divergences the matching samples from and the loss share their computation: a
  matched pair is not projected again (`losses.FullDistributions` for small batches, else
  `pair_loss(values=...)`; benchmarks/distill_step_cost.py measures the step).
- Step 3 is plain SFT: `vlsi_model.training.sft.SFTObjective`.

Frozen sub-models are kept in eval mode even when the trainer calls `.train()` on the
objective, so they behave identically in every step (no dropout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlsi_model.distill.adapters import BackboneAdapter, get_adapter
from vlsi_model.distill.losses import (
    DenseTeacher,
    FullDistributions,
    LossConfig,
    TeacherTarget,
    divergence_matrix,
    gather_positions,
    head_vocab_size,
    last_layer_loss,
    mean_next_token_ce,
    next_token_targets,
    pair_loss,
    response_positions,
    should_materialize,
)
from vlsi_model.distill.matching import LayerMatcher, MatchRecorder
from vlsi_model.distill.teacher_cache import TeacherCache
from vlsi_model.distill.verbalizer import VerbalizedHead, Verbalizers


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _heads(model: nn.Module, adapter: BackboneAdapter, verbs: Verbalizers) -> dict[int, VerbalizedHead]:
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    return {t: VerbalizedHead(verbs[t], norm, head) for t in verbs.target_layers}


def _check_targets(model: nn.Module, adapter: BackboneAdapter, verbs: Verbalizers, who: str) -> None:
    n = adapter.num_layers(model)
    if max(verbs.target_layers) >= n:
        raise ValueError(f"{who} verbalizers target layers {verbs.target_layers} but the {who} has {n} layers")
    if verbs.hidden_size != adapter.hidden_size(model):
        raise ValueError(f"{who} verbalizers have width {verbs.hidden_size}, the {who} {adapter.hidden_size(model)}")


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
        _check_targets(model, self.adapter, verbalizers, "model")
        _freeze(model)
        self.model = model
        self.verbalizers = verbalizers
        for p in verbalizers.parameters():
            p.requires_grad_(True)
        self.chunk_tokens = int(chunk_tokens)
        self._heads = _heads(model, self.adapter, verbalizers)  # plain dict: not registered twice

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


class InteractionObjective(nn.Module):
    """Step 2: layer-wise distillation with adaptive order-preserving matching (see the module docstring).

    Give either `teacher` (+ `teacher_verbalizers`) to run the teacher online, or
    `teacher_cache` (then `teacher` may be None). With a cache, batches must carry
    `sample_index` (see `teacher_cache.IndexedDataset`).
    """

    def __init__(
        self,
        student: nn.Module,
        student_verbalizers: Verbalizers,
        teacher: nn.Module | None = None,
        teacher_verbalizers: Verbalizers | None = None,
        matcher: LayerMatcher | None = None,
        recorder: MatchRecorder | None = None,
        loss_config: LossConfig | None = None,
        teacher_cache: TeacherCache | None = None,
        student_adapter: BackboneAdapter | None = None,
        teacher_adapter: BackboneAdapter | None = None,
        freeze_student_head: bool = True,
    ) -> None:
        super().__init__()
        if teacher is None and teacher_cache is None:
            raise ValueError("give a teacher model or a teacher cache")
        self.student_adapter = student_adapter or get_adapter(student)
        _check_targets(student, self.student_adapter, student_verbalizers, "student")
        self.student = student
        self.student_verbalizers = student_verbalizers
        for p in student_verbalizers.parameters():
            p.requires_grad_(True)
        if freeze_student_head:
            _freeze(self.student_adapter.final_norm(student))
            _freeze(self.student_adapter.lm_head(student))
        self.loss_config = loss_config or LossConfig()
        self.matcher = matcher or LayerMatcher()
        self.teacher_cache = teacher_cache
        self.teacher: nn.Module | None = None
        self.teacher_verbalizers: Verbalizers | None = None
        if teacher_cache is not None:
            self.teacher_layers = list(teacher_cache.target_layers)
            if abs(teacher_cache.temperature - self.loss_config.temperature) > 1e-9:
                raise ValueError(
                    f"teacher cache temperature {teacher_cache.temperature} != loss temperature "
                    f"{self.loss_config.temperature}"
                )
        else:
            if teacher_verbalizers is None:
                raise ValueError("an online teacher needs its (trained) verbalizers")
            self.teacher_adapter = teacher_adapter or get_adapter(teacher)
            _check_targets(teacher, self.teacher_adapter, teacher_verbalizers, "teacher")
            _freeze(teacher)
            _freeze(teacher_verbalizers)
            self.teacher = teacher
            self.teacher_verbalizers = teacher_verbalizers
            self.teacher_layers = list(teacher_verbalizers.target_layers)
            self._teacher_heads = _heads(teacher, self.teacher_adapter, teacher_verbalizers)
        self.student_layers = list(student_verbalizers.target_layers)
        # Fail at construction, not at step 1, if the variant cannot match these sizes.
        self.matcher.needed_pairs(len(self.student_layers), len(self.teacher_layers))
        self.recorder = recorder or MatchRecorder(self.student_layers, self.teacher_layers)
        self._student_heads = _heads(student, self.student_adapter, student_verbalizers)

    def train(self, mode: bool = True) -> InteractionObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            assert self.teacher_verbalizers is not None
            self.teacher_verbalizers.eval()
        return self

    def set_progress(self, step: int, max_steps: int) -> None:
        """Called by the trainer before each optimizer step: reseeds matching, tells the recorder."""
        self.matcher.set_step(step)
        self.recorder.set_progress(step, max_steps)

    def _teacher_targets(
        self, batch: Mapping[str, Any], mask: torch.Tensor, device: torch.device
    ) -> tuple[list[TeacherTarget], TeacherTarget]:
        if self.teacher_cache is not None:
            targets, final = self.teacher_cache.targets(batch, device)
            return list(targets), final
        assert self.teacher is not None
        with torch.no_grad():
            hs = self.teacher_adapter.forward_with_hidden_states(self.teacher, batch, self.teacher_layers)
        targets: list[TeacherTarget] = [
            DenseTeacher(gather_positions(hs.layers[t], mask), self._teacher_heads[t]) for t in self.teacher_layers
        ]
        final = DenseTeacher(gather_positions(hs.final, mask), self.teacher_adapter.lm_head(self.teacher))
        return targets, final

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.loss_config
        mask = response_positions(batch["labels"])
        hs = self.student_adapter.forward_with_hidden_states(self.student, batch, self.student_layers)
        device = hs.final.device
        student_hidden = [gather_positions(hs.layers[t], mask) for t in self.student_layers]
        student_final = gather_positions(hs.final, mask)
        heads = [self._student_heads[t] for t in self.student_layers]
        teachers, teacher_final = self._teacher_targets(batch, mask, device)

        num_s, num_t = len(self.student_layers), len(self.teacher_layers)
        needed = self.matcher.needed_pairs(num_s, num_t) if self.matcher.needs_divergences else None
        num_tokens = int(student_final.shape[0])
        vocab = min(min(head_vocab_size(h) for h in heads), min(t.vocab_size for t in teachers))
        num_pairs = int(needed.sum()) if needed is not None else num_s
        op, direction = cfg.intermediate_op, cfg.direction
        # Two implementations of the same loss (see losses.py): every distribution once when the
        # batch's vocabulary tensors fit the budget, else chunks with recomputation in backward.
        if should_materialize(cfg, num_tokens, vocab, num_s, num_t, num_pairs):
            full = FullDistributions(student_hidden, heads, teachers, cfg.temperature)
            d = full.divergences(op, direction, needed) if needed is not None else None
            matches = self.matcher.match(d, num_s, num_t)
            inter, terms = full.pair_loss(list(enumerate(matches)), op, direction)
            del full  # drops the unmatched pairs' graphs
            last_cfg = dataclasses.replace(cfg, chunk_tokens=max(1, num_tokens), recompute=False)
        else:
            d = None
            if needed is not None:
                d = divergence_matrix(student_hidden, heads, teachers, op, direction, cfg.temperature,
                                      cfg.chunk_tokens, needed=needed)
            matches = self.matcher.match(d, num_s, num_t)
            # The matched pairs' values are the matrix entries: only their backward recomputes.
            inter, terms = pair_loss(student_hidden, heads, teachers, list(enumerate(matches)), cfg, values=d)
            last_cfg = cfg
        if self.training:  # evaluation forwards are not part of the training statistics
            self.recorder.record(matches)

        loss = cfg.intermediate_weight * inter
        last = last_layer_loss(student_final, self.student_adapter.lm_head(self.student), teacher_final, last_cfg)
        metrics: dict[str, Any] = {"loss_intermediate": inter.detach()}
        if last is not None:
            loss = loss + cfg.last_weight * last
            metrics["loss_last"] = last.detach()
        metrics["match_mean_teacher_target"] = sum(matches) / len(matches)
        metrics["match_mean_teacher_layer"] = sum(self.teacher_layers[t] for t in matches) / len(matches)
        for s, (t, term) in enumerate(zip(matches, terms, strict=True)):
            metrics[f"match_s{self.student_layers[s]}"] = float(self.teacher_layers[t])
            metrics[f"div_s{self.student_layers[s]}"] = term.detach()
        metrics["num_tokens"] = float(student_final.shape[0])
        return {"loss": loss, **metrics}
