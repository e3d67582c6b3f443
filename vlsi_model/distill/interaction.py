"""VLsI step 2, interaction: layer-wise distillation with adaptive, order-preserving matching (`run_interact`).

The VLsI training steps as objectives for the generic trainer (`vlsi_model.training.trainer.train`).

An objective is an `nn.Module` whose `forward(batch)` returns `{"loss": scalar tensor,
**scalar metrics}` (detached tensors or floats, so no device sync per step); the trainer
optimises exactly the parameters with `requires_grad`, so each objective's constructor
sets which parameters train:

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

Frozen sub-models are kept in eval mode even when the trainer calls `.train()` on the
objective, so they behave identically in every step (no dropout).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlsi_model.distill.adapters import BackboneAdapter, get_adapter
from vlsi_model.distill.config import (
    DTYPES,
    INTERACTION_DIR,
    MATCHING_NAME,
    STUDENT_VERBALIZED_DIR,
    TEACHER_CACHE_DIR,
    TEACHER_VERBALIZERS_DIR,
    DistillConfig,
)
from vlsi_model.distill.losses import (
    DenseTeacher,
    FullDistributions,
    LossConfig,
    TeacherTarget,
    divergence_matrix,
    gather_positions,
    head_vocab_size,
    last_layer_loss,
    pair_loss,
    response_positions,
    should_materialize,
)
from vlsi_model.distill.matching import LayerMatcher, MatchRecorder
from vlsi_model.distill.steps_common import (
    check_same_tokenizer,
    check_targets,
    free_memory,
    freeze,
    load_config_vocab,
    load_dataset,
    load_model,
    merged,
    prepare_trainable,
    process_state,
    publish_output,
    require_output,
    skip_or_refuse,
    verbalized_heads,
)
from vlsi_model.distill.teacher_cache import TeacherCache
from vlsi_model.distill.verbalizer import (
    Verbalizers,
    load_verbalizers,
    read_verbalizer_meta,
    save_verbalizers,
    verbalizer_dir,
)
from vlsi_model.training.config import ConfigError

log = logging.getLogger(__name__)


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
        check_targets(student, self.student_adapter, student_verbalizers, "student")
        self.student = student
        self.student_verbalizers = student_verbalizers
        for p in student_verbalizers.parameters():
            p.requires_grad_(True)
        if freeze_student_head:
            freeze(self.student_adapter.final_norm(student))
            freeze(self.student_adapter.lm_head(student))
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
            check_targets(teacher, self.teacher_adapter, teacher_verbalizers, "teacher")
            freeze(teacher)
            freeze(teacher_verbalizers)
            self.teacher = teacher
            self.teacher_verbalizers = teacher_verbalizers
            self.teacher_layers = list(teacher_verbalizers.target_layers)
            self._teacher_heads = verbalized_heads(teacher, self.teacher_adapter, teacher_verbalizers)
        self.student_layers = list(student_verbalizers.target_layers)
        # Fail at construction, not at step 1, if the variant cannot match these sizes.
        self.matcher.needed_pairs(len(self.student_layers), len(self.teacher_layers))
        self.recorder = recorder or MatchRecorder(self.student_layers, self.teacher_layers)
        self._student_heads = verbalized_heads(student, self.student_adapter, student_verbalizers)

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


def _teacher_cache_path(cfg: DistillConfig) -> Path:
    return Path(cfg.teacher_cache.path).expanduser() if cfg.teacher_cache.path else cfg.out / TEACHER_CACHE_DIR


def _ensure_teacher_cache(cfg: DistillConfig, dataset: Any, pad_id: int, vocab_limit: int,
                          needed: list[int]) -> Path:
    """Build the teacher cache once (main process), or check that an existing one fits this run.

    `needed`: the sorted dataset indices step 2 reads. The cache is built for these
    (coverage "run") or for the whole dataset (coverage "dataset"); an existing cache must hold
    at least these, whichever way it was built.
    """
    from vlsi_model.distill.teacher_cache import (
        INDEX_FILE,
        IndexedDataset,
        TeacherCache,
        build_teacher_cache,
        indexed_collate,
    )
    from vlsi_model.training.dataset import make_collate_fn

    path = _teacher_cache_path(cfg)
    cc = cfg.teacher_cache
    state = process_state()
    if not (path / INDEX_FILE).is_file() and state.is_main_process:
        teacher, _, _ = load_model(cfg.teacher.path, cfg.teacher.dtype, device=state.device)
        t_verbs = load_verbalizers(cfg.out / TEACHER_VERBALIZERS_DIR, expect_hidden_size=get_adapter(teacher)
                                   .hidden_size(teacher))
        t_verbs = t_verbs.to(next(teacher.parameters()).device)
        indexed = IndexedDataset(dataset)
        collate = indexed_collate(make_collate_fn(pad_id))
        ids = needed if cc.coverage == "run" else list(range(len(indexed)))
        batches = (
            collate([indexed[i] for i in ids[start:start + cc.batch_size]])
            for start in range(0, len(ids), cc.batch_size)
        )
        log.info("building the teacher cache (k=%d, %d of %d samples) in %s", cc.k, len(ids), len(indexed), path)
        publish_output(path, lambda tmp: build_teacher_cache(
            teacher, t_verbs, batches, tmp, k=cc.k, vocab_size=vocab_limit, temperature=cfg.loss.temperature,
            chunk_tokens=cfg.loss.chunk_tokens, dtype=DTYPES[cc.dtype]))
        free_memory(teacher, t_verbs)
    state.wait_for_everyone()
    cache = TeacherCache(path)
    problems = []
    if cache.k != min(cc.k, vocab_limit):
        problems.append(f"k {cache.k} (config {cc.k})")
    if cache.vocab_size != vocab_limit:
        problems.append(f"vocabulary {cache.vocab_size} (shared vocabulary {vocab_limit})")
    if abs(cache.temperature - cfg.loss.temperature) > 1e-9:
        problems.append(f"temperature {cache.temperature} (config {cfg.loss.temperature})")
    missing = [i for i in needed if str(i) not in cache.samples]
    if missing:
        problems.append(f"lacks {len(missing)} of the {len(needed)} samples this run draws (e.g. {missing[0]}; "
                        "built for another seed, batch size, step count or dataset)")
    if problems:
        raise ConfigError(
            f"the teacher cache {path} does not fit this run: {'; '.join(problems)}; delete it to rebuild"
        )
    return path


def run_interact(cfg: DistillConfig, resume: bool = False, force_resume: bool = False) -> None:
    """Step 2: layer-wise distillation of the verbalized student from the (frozen) verbalized teacher."""
    from vlsi_model.distill.teacher_cache import IndexedDataset, TeacherCache, indexed_collate
    from vlsi_model.models import save_model_dir
    from vlsi_model.training.dataset import make_collate_fn
    from vlsi_model.training.trainer import drawn_sample_indices, train

    out = cfg.out
    dest = out / INTERACTION_DIR
    if skip_or_refuse(dest, resume, "interact"):
        return
    src = out / STUDENT_VERBALIZED_DIR
    require_output(src, "the verbalized student", "interact")
    require_output(out / TEACHER_VERBALIZERS_DIR, "the teacher's verbalizers", "interact")
    state = process_state()
    tc = cfg.train_config("interact", "interact")

    student, tokenizer, image_processor = load_model(src, cfg.student.dtype)
    s_adapter = get_adapter(student)
    s_verbs = load_verbalizers(verbalizer_dir(src), expect_hidden_size=s_adapter.hidden_size(student))
    t_meta = read_verbalizer_meta(out / TEACHER_VERBALIZERS_DIR)
    dataset = load_dataset(cfg, tokenizer, image_processor)
    pad_id = int(tokenizer.pad_token_id)
    matcher = LayerMatcher(cfg.matching)
    run_dir = tc.output_path
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = MatchRecorder(s_verbs.target_layers, t_meta["target_layers"],
                             path=run_dir / f"matches_rank{state.process_index}.jsonl")
    if not resume:  # a fresh run (the trainer refuses one over existing checkpoints): old records are stale
        recorder.reset()

    teacher = t_verbs = None
    if cfg.teacher_cache.enabled:
        t_vocab = int(load_config_vocab(cfg.teacher.path))
        vocab_limit = min(s_adapter.vocab_size(student), t_vocab)
        needed = drawn_sample_indices(tc, len(dataset), state.num_processes)
        cache = TeacherCache(_ensure_teacher_cache(cfg, dataset, pad_id, vocab_limit, needed))
        train_set: Any = IndexedDataset(dataset)
        collate = indexed_collate(make_collate_fn(pad_id))
    else:
        teacher, t_tokenizer, _ = load_model(cfg.teacher.path, cfg.teacher.dtype)
        check_same_tokenizer(t_tokenizer, tokenizer)
        t_verbs = load_verbalizers(out / TEACHER_VERBALIZERS_DIR,
                                   expect_hidden_size=get_adapter(teacher).hidden_size(teacher))
        cache = None
        train_set, collate = dataset, make_collate_fn(pad_id)

    model, is_peft = prepare_trainable(student, s_adapter, cfg.lora, "interact", tc.seed,
                                        interact_trains=cfg.student.interact_trains)
    objective = InteractionObjective(
        model, s_verbs, teacher, t_verbs, matcher, recorder, cfg.loss, teacher_cache=cache,
        freeze_student_head=cfg.student.interact_trains == "decoder",
    )
    result = train(objective, train_set, collate, tc, resume=resume, progress_desc="interact",
                   force_resume=force_resume)
    log.info("interaction: %d steps, final loss %.4f", result.steps, result.final_loss)
    state.wait_for_everyone()
    final_model = merged(model, is_peft)

    def build(p: Path) -> None:
        save_model_dir(final_model.eval(), tokenizer, image_processor, p,
                       metadata={"placeholder": False, "recipe": "vlsi_distill", "step": "interact",
                                 "teacher": str(cfg.teacher.path), "steps": result.steps,
                                 "final_loss": result.final_loss, "matching": cfg.matching.variant,
                                 "lora": cfg.lora.enabled and "interact" in cfg.lora.steps})
        save_verbalizers(s_verbs.eval(), verbalizer_dir(p), model_type=s_adapter.model_type)
        merged_recorder = MatchRecorder(s_verbs.target_layers, t_meta["target_layers"])
        for rank_file in sorted(run_dir.glob("matches_rank*.jsonl")):
            merged_recorder.extend_from_file(rank_file)
        merged_recorder.set_progress(0, tc.max_steps)
        merged_recorder.write(p, name=MATCHING_NAME)

    if state.is_main_process:
        publish_output(dest, build)
    state.wait_for_everyone()
    free_memory(teacher, t_verbs, objective, model, final_model)
