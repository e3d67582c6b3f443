"""Divergences between verbalized distributions, computed in chunks of tokens.

Why one file of ~660 lines: every divergence and its chunked form sit beside each other so
they are checked against each other (the chunked forms must equal the plain ones).

The expensive object in VLsI is the vocabulary-sized distribution: every target layer of
both models is projected to the ~152k-token vocabulary for every response token. Held at
once, S + T targets x N tokens x V floats do not fit any GPU. Here every quantity is
computed over chunks of `chunk_tokens` tokens, and the loss that needs gradients recomputes
each chunk in the backward pass (`torch.utils.checkpoint`, non-reentrant, or
`_DivergenceFromValue`), so the autograd graph keeps only the [N, d] hidden states, never a
[N, V] tensor. Peak memory is a few chunk x V tensors whatever the number of tokens and
targets (`test_distill_components.py` measures it).

What each vocabulary projection costs is the other half of the design (measured by
benchmarks/distill_step_cost.py): a projection is an [N, d] x [d, V] matmul, the bulk of the
interaction step's own work. So
- `divergence_matrix` projects every student and every teacher target once per chunk (not
  once per pair: a student target is compared with up to T - S + 1 teacher targets), and
  exponentiates a teacher chunk once for all the students it is compared with;
- the loss of a matched pair does not redo its forward: its value is the matrix entry
  already computed (`pair_loss(values=...)`), and only the backward pass recomputes the
  pair, chunk by chunk (what checkpointing would do, without checkpointing's forward);
- when the whole batch's distributions are small (`LossConfig.materialize_mib`; tokens x
  vocabulary x targets, e.g. small models or short answers), `FullDistributions` computes
  every distribution exactly once, keeps the student's in the autograd graph and takes the
  matrix and the loss from the same tensors: no recomputation at all. Memory then grows
  with tokens x targets, which is why it is bounded by a budget.
The values are the same in every path (up to float rounding of sums).

Definitions (all per token, then averaged over the response tokens of the batch, every
token weighted equally):
- Distributions: p = softmax(z / temperature) over the vocabulary prefix shared by both
  models (`V = min(V_student, V_teacher)`), renormalised on that prefix. Qwen2-VL-2B pads
  its vocabulary to 151936 rows, 7B/72B to 152064; the rows past the tokenizer's size are
  padding tokens no data ever contains, so their mass is ~0 and dropping them before the
  softmax compares the two models on the tokens that exist. Softmaxes run in float32.
- "kld" with `direction`:
  forward   KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))  [default; mean-seeking]
  reverse   KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v))  [mode-seeking]
  symmetric 0.5 * (forward + reverse)                                       [Jeffreys / 2]
  No temperature**2 factor is applied (the default temperature is 1, where it is moot).
- "ce": cross-entropy of the student's distribution against the teacher's argmax token,
  -log p_s(argmax_v p_t(v)): hard-label distillation, what the paper's "CE" op most
  plausibly means. `direction` does not apply.
- "l2": squared Euclidean distance between the two *probability* vectors,
  sum_v (p_s(v) - p_t(v))**2, in [0, 2]. Probabilities, not log-probabilities: an L2 on
  log-probs is dominated by the ~150k tokens both models consider impossible, whose
  log-probs (-20 vs -30) carry no information; on probabilities the error sits where the
  mass is. Summed over the vocabulary, not averaged (a mean would shrink it by 1/V).
- Tokens: the positions whose *next* token is a response token (`response_positions`):
  the hidden state at position i predicts token i + 1, exactly as in the LM loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlsi_model.prompting import IGNORE_INDEX

INTERMEDIATE_OPS = ("kld", "l2", "ce")
LAST_OPS = ("kld", "ce", "none")
DIRECTIONS = ("forward", "reverse", "symmetric")
DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class LossConfig:
    """Loss options of the interaction step (defaults = VLSI_METHOD.md's defaults)."""

    intermediate_op: str = "kld"
    last_op: str = "kld"
    direction: str = "forward"
    temperature: float = 1.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    intermediate_weight: float = 1.0
    last_weight: float = 1.0
    # Recompute each chunk in backward (flat memory). False keeps every chunk's vocabulary
    # tensors in the graph instead: faster, memory grows with tokens x targets (tiny models only).
    recompute: bool = True
    # The interaction step computes every distribution of the batch once and keeps them (no
    # chunking, no recomputation: fastest) when its estimate of those vocabulary-sized tensors
    # (`materialized_bytes`) is at most this many MiB; above it, chunks + recomputation (flat
    # memory). 0 = always chunk. A real 152k vocabulary exceeds it at a few hundred tokens.
    materialize_mib: float = 256.0

    def __post_init__(self) -> None:
        if self.intermediate_op not in INTERMEDIATE_OPS:
            raise ValueError(f"intermediate_op must be one of {INTERMEDIATE_OPS}, got {self.intermediate_op!r}")
        if self.last_op not in LAST_OPS:
            raise ValueError(f"last_op must be one of {LAST_OPS}, got {self.last_op!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.intermediate_weight < 0 or self.last_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if not self.materialize_mib >= 0:
            raise ValueError(f"materialize_mib must be >= 0, got {self.materialize_mib}")


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions i whose next token i + 1 is a response token (labels != -100).

    The last position never predicts anything inside the sequence, so it is always False.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def gather_positions(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, d] and a [B, L] mask -> [N, d], rows in batch-major, position-minor order."""
    if hidden.shape[:2] != mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} disagree")
    return hidden[mask.to(hidden.device)]


def next_token_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] the next-token ids at the positions of `mask` (= `response_positions(labels)`)."""
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    return nxt[mask]


# ---------------------------------------------------------------------------------------------
# Per-token divergences
# ---------------------------------------------------------------------------------------------


def uses_teacher_probs(op: str, direction: str) -> bool:
    """Whether `dense_divergence` needs exp(teacher log-probs) for this op and direction."""
    return op == "l2" or (op == "kld" and direction in ("forward", "symmetric"))


def dense_divergence(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    op: str,
    direction: str = "forward",
    teacher_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """[c] per-token divergence between two [c, V] log-probability tensors (see the module docstring).

    `teacher_probs`, if given, must be `teacher_logp.exp()`: a teacher chunk compared with
    several student targets is then exponentiated once instead of once per comparison.
    """
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"shape mismatch {tuple(student_logp.shape)} vs {tuple(teacher_logp.shape)}")
    if op == "ce":
        target = teacher_logp.argmax(dim=-1, keepdim=True)
        return -student_logp.gather(-1, target).squeeze(-1)
    if op not in ("l2", "kld"):
        raise ValueError(f"unknown op {op!r}")
    if op == "kld" and direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    t_probs = None
    if uses_teacher_probs(op, direction):
        t_probs = teacher_logp.exp() if teacher_probs is None else teacher_probs
    if op == "l2":
        return (student_logp.exp() - t_probs).pow(2).sum(-1)
    if direction == "forward":
        return (t_probs * (teacher_logp - student_logp)).sum(-1)
    if direction == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    diff = teacher_logp - student_logp  # symmetric
    return 0.5 * ((t_probs - student_logp.exp()) * diff).sum(-1)


def log_probs(logits: torch.Tensor, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax of logits / temperature over the first `vocab` entries."""
    z = logits[..., :vocab].float()
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=-1)


class TeacherChunk(Protocol):
    """The teacher's distributions for one chunk of tokens, in some representation."""

    def divergence(self, student_logp: torch.Tensor, op: str, direction: str) -> torch.Tensor:
        """[c] per-token divergence of the student's [c, V] log-probs to this chunk."""
        ...


class TeacherTarget(Protocol):
    """One teacher target (a verbalized layer or the final layer) over the batch's N tokens.

    Implemented by `DenseTeacher` (online: teacher hidden states + head) and by
    `teacher_cache.CachedTeacherTarget` (precomputed top-k + tail).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def chunk(self, start: int, end: int, vocab: int, temperature: float) -> TeacherChunk: ...


@dataclass
class DenseChunk:
    """Full [c, V] teacher log-probs; their exp is computed at the first comparison that needs it and kept."""

    logp: torch.Tensor
    probs: torch.Tensor | None = field(default=None, repr=False)

    def divergence(self, student_logp: torch.Tensor, op: str, direction: str) -> torch.Tensor:
        logp = self.logp.to(student_logp.device)
        if self.probs is None and uses_teacher_probs(op, direction):
            self.probs = logp.exp()
        probs = None if self.probs is None else self.probs.to(student_logp.device)
        return dense_divergence(student_logp, logp, op, direction, teacher_probs=probs)


def head_vocab_size(head: nn.Module) -> int:
    """Output size of a head: `VerbalizedHead.vocab_size` or an `nn.Linear`'s out_features."""
    size = getattr(head, "vocab_size", None)
    if size is None:
        size = getattr(head, "out_features", None)
    if size is None:
        raise TypeError(f"cannot tell the vocabulary size of {type(head).__name__}")
    return int(size)


class DenseTeacher:
    """Teacher distributions computed online, chunk by chunk, from [N, d_t] teacher hidden states.

    The teacher is frozen: chunks are computed without gradients.
    """

    def __init__(self, hidden: torch.Tensor, head: nn.Module) -> None:
        self.hidden = hidden.detach()
        self.head = head
        self._vocab = head_vocab_size(head)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def chunk(self, start: int, end: int, vocab: int, temperature: float) -> DenseChunk:
        with torch.no_grad():
            return DenseChunk(log_probs(self.head(self.hidden[start:end]), vocab, temperature))


# ---------------------------------------------------------------------------------------------
# Chunked reductions
# ---------------------------------------------------------------------------------------------


def _shared_vocab(student_head: nn.Module, teacher: TeacherTarget) -> int:
    return min(head_vocab_size(student_head), teacher.vocab_size)


def _chunk_sum(
    hidden: torch.Tensor,
    student_head: nn.Module,
    teacher: TeacherTarget,
    start: int,
    end: int,
    vocab: int,
    op: str,
    direction: str,
    temperature: float,
) -> torch.Tensor:
    student_logp = log_probs(student_head(hidden), vocab, temperature)
    return teacher.chunk(start, end, vocab, temperature).divergence(student_logp, op, direction).sum()


def _needs_graph(hidden: torch.Tensor, head: nn.Module) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))


@dataclass(frozen=True)
class _PairSpec:
    """What `_DivergenceFromValue.backward` needs to recompute one (student head, teacher target) pair."""

    head: nn.Module
    teacher: TeacherTarget
    vocab: int
    op: str
    direction: str
    temperature: float
    chunk_tokens: int


class _DivergenceFromValue(torch.autograd.Function):
    """The mean divergence of a pair whose value is already known (a `divergence_matrix` entry).

    Forward returns that value: nothing is computed. Backward recomputes the pair chunk by
    chunk with gradients, exactly as the checkpointed `_chunk_sum` would in its backward, so
    memory stays at one chunk's vocabulary tensors. Compared with `torch.utils.checkpoint`
    this skips the forward projection of the pair (student and teacher), which the matrix
    has already done. The head's trainable parameters are explicit inputs, so their
    gradients are returned to the engine like any other (no nested backward into leaves).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, value: torch.Tensor, spec: _PairSpec, hidden: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.spec = spec
        ctx.save_for_backward(hidden, *params)
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        spec: _PairSpec = ctx.spec
        hidden, *params = ctx.saved_tensors
        wants_hidden = bool(ctx.needs_input_grad[2])
        wants = [bool(x) for x in ctx.needs_input_grad[3:]]
        n = int(hidden.shape[0])
        upstream = grad / n  # d(total / n) / d(part): the same scalar checkpointing would pass down
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        live = [p for p, w in zip(params, wants, strict=True) if w]
        for start in range(0, n, spec.chunk_tokens):
            end = min(n, start + spec.chunk_tokens)
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(wants_hidden)
                part = _chunk_sum(h, spec.head, spec.teacher, start, end, spec.vocab, spec.op, spec.direction,
                                  spec.temperature)
            inputs = ([h] if wants_hidden else []) + live
            grads = list(torch.autograd.grad(part, inputs, upstream, allow_unused=True))
            if wants_hidden:
                g = grads.pop(0)
                if g is not None:
                    grad_hidden[start:end] = g
            k = 0
            for i, w in enumerate(wants):
                if not w:
                    continue
                g = grads[k]
                k += 1
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, None, grad_hidden, *grad_params)


def mean_divergence(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher: TeacherTarget,
    op: str = "kld",
    direction: str = "forward",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    recompute: bool = True,
    value: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean over N tokens of the divergence between `student_head(student_hidden)` and `teacher`.

    student_hidden: [N, d_s] (with gradients); student_head: hidden -> logits (a
    `VerbalizedHead` for an intermediate target, the LM head for the final layer, whose
    input is already normed). With `recompute` (default) every chunk is wrapped in a
    non-reentrant `torch.utils.checkpoint`, so only the chunk's [c, d_s] input is kept for
    backward and its vocabulary-sized tensors are rebuilt there, one chunk at a time.
    `value`: this mean, already computed without gradients (a `divergence_matrix` entry for
    the same inputs); the forward then returns it instead of computing it again, and with
    `recompute` only the backward pass projects (`_DivergenceFromValue`). A NaN value (an
    entry the matrix skipped) is ignored.
    With no tokens, returns a zero that is still connected to the graph (backward works).
    """
    n = int(student_hidden.shape[0])
    if n != teacher.num_tokens:
        raise ValueError(f"student has {n} tokens, teacher {teacher.num_tokens}")
    if n == 0:
        return student_hidden.sum() * 0.0
    vocab = _shared_vocab(student_head, teacher)
    needs_graph = _needs_graph(student_hidden, student_head)
    if value is not None and math.isfinite(float(value)) and (recompute or not needs_graph):
        known = torch.as_tensor(value, dtype=torch.float32).to(student_hidden.device)
        if not needs_graph:
            return known
        params = [p for p in student_head.parameters() if p.requires_grad]
        spec = _PairSpec(student_head, teacher, vocab, op, direction, temperature, chunk_tokens)
        return _DivergenceFromValue.apply(known, spec, student_hidden, *params)
    use_checkpoint = recompute and needs_graph
    total: torch.Tensor | None = None
    for start in range(0, n, chunk_tokens):
        end = min(n, start + chunk_tokens)
        args = (student_hidden[start:end], student_head, teacher, start, end, vocab, op, direction, temperature)
        part = checkpoint(_chunk_sum, *args, use_reentrant=False) if use_checkpoint else _chunk_sum(*args)
        total = part if total is None else total + part
    assert total is not None
    return total / n


def _check_targets(
    student_hidden: Sequence[torch.Tensor], student_heads: Sequence[nn.Module], teachers: Sequence[TeacherTarget]
) -> int:
    """The common number of tokens N of all targets (ValueError if they disagree)."""
    if len(student_heads) != len(student_hidden):
        raise ValueError("one head per student target")
    n = int(student_hidden[0].shape[0])
    if any(int(h.shape[0]) != n for h in student_hidden) or any(t.num_tokens != n for t in teachers):
        raise ValueError("all targets must cover the same tokens")
    return n


def _needed_matrix(needed: torch.Tensor | None, s_count: int, t_count: int) -> torch.Tensor:
    if needed is None:
        return torch.ones(s_count, t_count, dtype=torch.bool)
    if tuple(needed.shape) != (s_count, t_count):
        raise ValueError(f"needed has shape {tuple(needed.shape)}, expected {(s_count, t_count)}")
    return needed.to("cpu", torch.bool)


@torch.no_grad()
def divergence_matrix(
    student_hidden: Sequence[torch.Tensor],
    student_heads: Sequence[nn.Module],
    teachers: Sequence[TeacherTarget],
    op: str = "kld",
    direction: str = "forward",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    needed: torch.Tensor | None = None,
) -> torch.Tensor:
    """[S, T] float32 matrix of mean per-token divergences, no gradients (for layer matching).

    Entries where `needed` ([S, T] bool) is False are not computed and hold NaN (a matcher
    whose search windows cannot reach them skips that work). Loop order: chunk -> every
    student target with a needed entry (projected once) -> teacher target (projected and
    exponentiated once) -> its needed student targets. So each target costs one vocabulary
    projection per token whatever the number of pairs. The chunk's student distributions are
    all alive at once, so the chunk is shrunk to 2 * chunk_tokens / (students + 1) tokens:
    the pass holds about as many chunk x V tensors as one pair at `chunk_tokens` would.
    """
    s_count, t_count = len(student_hidden), len(teachers)
    if len(student_heads) != s_count:
        raise ValueError("one head per student target")
    if s_count == 0 or t_count == 0:
        return torch.zeros(s_count, t_count)
    n = _check_targets(student_hidden, student_heads, teachers)
    needed = _needed_matrix(needed, s_count, t_count)
    out = torch.full((s_count, t_count), float("nan"))
    out[needed] = 0.0
    if n == 0:
        return out
    vocab = min(min(head_vocab_size(h) for h in student_heads), min(t.vocab_size for t in teachers))
    need = needed.tolist()
    active = [s for s in range(s_count) if any(need[s])]
    step = max(1, (2 * chunk_tokens) // (len(active) + 1))
    # Accumulated on the device: one transfer at the end instead of a sync per (chunk, pair).
    sums = torch.zeros(s_count, t_count, dtype=torch.float64, device=student_hidden[0].device)
    for start in range(0, n, step):
        end = min(n, start + step)
        student_logp = {
            s: log_probs(student_heads[s](student_hidden[s][start:end]), vocab, temperature) for s in active
        }
        for t, teacher in enumerate(teachers):
            rows = [s for s in active if need[s][t]]
            if not rows:
                continue
            tchunk = teacher.chunk(start, end, vocab, temperature)
            for s in rows:
                sums[s, t] += tchunk.divergence(student_logp[s], op, direction).double().sum()
            del tchunk
        del student_logp
    out[needed] = (sums.cpu() / n).float()[needed]
    return out


def pair_loss(
    student_hidden: Sequence[torch.Tensor],
    student_heads: Sequence[nn.Module],
    teachers: Sequence[TeacherTarget],
    pairs: Sequence[tuple[int, int]],
    config: LossConfig,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum over `pairs` (s, t) of the mean divergence, per-pair terms) WITH gradients.

    Each pair is its own chunked, recomputed reduction, so during backward only one
    (chunk, pair)'s vocabulary tensors exist at a time. `values`: the [S, T]
    `divergence_matrix` of these very targets with `config`'s op, direction and
    temperature; a pair whose entry is there is not computed again in the forward pass
    (see `mean_divergence(value=...)`).
    """
    if not pairs:
        raise ValueError("no pairs")
    terms = [
        mean_divergence(
            student_hidden[s], student_heads[s], teachers[t], config.intermediate_op, config.direction,
            config.temperature, config.chunk_tokens, config.recompute,
            value=None if values is None else values[s, t],
        )
        for s, t in pairs
    ]
    return torch.stack(terms).sum(), terms


# ---------------------------------------------------------------------------------------------
# Small batches: every distribution once, no recomputation
# ---------------------------------------------------------------------------------------------


def materialized_bytes(
    num_tokens: int, vocab: int, num_student: int, num_teacher: int, num_pairs: int, op: str = "kld",
    direction: str = "forward",
) -> int:
    """Upper estimate of the vocabulary-sized float32 tensors `FullDistributions` holds at its peak.

    Counted in [N, V] tensors: the student targets' log-probs kept for backward and their
    logits (2 S), the teacher targets' log-probs and probabilities (2 T), what each compared
    pair's graph saves until the matching has picked (forward KL and CE: at most 1, the
    cached teacher's tail logsumexp; reverse or symmetric KL and L2: 2), and 6 for the
    final layer and temporaries.
    """
    per_pair = 1 if op == "ce" or (op == "kld" and direction == "forward") else 2
    return 4 * num_tokens * vocab * (2 * num_student + 2 * num_teacher + per_pair * num_pairs + 6)


def should_materialize(config: LossConfig, num_tokens: int, vocab: int, num_student: int, num_teacher: int,
                       num_pairs: int) -> bool:
    """True when the interaction step should use `FullDistributions` (see `LossConfig.materialize_mib`).

    Always with `recompute=False` (which already accepts memory growing with tokens x targets).
    """
    if not config.recompute:
        return True
    estimate = materialized_bytes(num_tokens, vocab, num_student, num_teacher, num_pairs, config.intermediate_op,
                                  config.direction)
    return estimate <= config.materialize_mib * 2**20


class FullDistributions:
    """Every target's distribution over all N tokens of the batch, each computed exactly once.

    The fast path of the interaction step when N x V is small (`should_materialize`): the
    student targets' log-probs are computed once, with gradients, and kept; each teacher
    target is projected once (no gradients) when first compared. `divergences` computes the
    pairs the matcher may look at *with* gradients: a forward KL keeps no extra tensor for
    that (the teacher probabilities it saves are shared), and the matched pairs' loss terms
    are then those very tensors, so nothing is computed twice; the unmatched pairs' graphs
    are freed as soon as the caller drops them. Values equal `divergence_matrix` /
    `mean_divergence` up to float rounding.
    """

    def __init__(
        self,
        student_hidden: Sequence[torch.Tensor],
        student_heads: Sequence[nn.Module],
        teachers: Sequence[TeacherTarget],
        temperature: float = 1.0,
    ) -> None:
        if not student_hidden or not teachers:
            raise ValueError("need at least one student and one teacher target")
        self.num_tokens = _check_targets(student_hidden, student_heads, teachers)
        self.vocab = min(min(head_vocab_size(h) for h in student_heads), min(t.vocab_size for t in teachers))
        self.temperature = temperature
        self.teachers = list(teachers)
        self.student_logp = [
            log_probs(head(hidden), self.vocab, temperature)
            for hidden, head in zip(student_hidden, student_heads, strict=True)
        ]
        self._teacher_chunks: dict[int, TeacherChunk] = {}
        self._terms: dict[tuple[int, int], torch.Tensor] = {}

    def _teacher(self, t: int) -> TeacherChunk:
        if t not in self._teacher_chunks:
            self._teacher_chunks[t] = self.teachers[t].chunk(0, self.num_tokens, self.vocab, self.temperature)
        return self._teacher_chunks[t]

    def term(self, s: int, t: int, op: str, direction: str) -> torch.Tensor:
        """Mean divergence of student target s to teacher target t (with gradients), computed once per step."""
        key = (s, t)
        if key not in self._terms:
            if self.num_tokens == 0:
                self._terms[key] = self.student_logp[s].sum() * 0.0
            else:
                per_token = self._teacher(t).divergence(self.student_logp[s], op, direction)
                self._terms[key] = per_token.sum() / self.num_tokens
        return self._terms[key]

    def divergences(self, op: str, direction: str, needed: torch.Tensor | None = None) -> torch.Tensor:
        """[S, T] float32 CPU matrix like `divergence_matrix` (NaN where not `needed`)."""
        s_count, t_count = len(self.student_logp), len(self.teachers)
        needed = _needed_matrix(needed, s_count, t_count)
        out = torch.full((s_count, t_count), float("nan"))
        need = needed.tolist()
        pairs = [(s, t) for t in range(t_count) for s in range(s_count) if need[s][t]]
        if pairs:
            values = torch.stack([self.term(s, t, op, direction).detach() for s, t in pairs]).float().cpu()
            for (s, t), v in zip(pairs, values.tolist(), strict=True):
                out[s, t] = v
        return out

    def pair_loss(
        self, pairs: Sequence[tuple[int, int]], op: str, direction: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Like `losses.pair_loss`: (sum of the pairs' mean divergences, per-pair terms), with gradients."""
        if not pairs:
            raise ValueError("no pairs")
        terms = [self.term(s, t, op, direction) for s, t in pairs]
        self._terms.clear()  # the unmatched pairs' graphs are no longer referenced from here
        return torch.stack(terms).sum(), terms


def last_layer_loss(
    student_final: torch.Tensor, student_lm_head: nn.Module, teacher_final: TeacherTarget, config: LossConfig
) -> torch.Tensor | None:
    """Divergence of the two models' final outputs with `config.last_op` (None for "none").

    `student_final` is the [N, d] hidden state *after* the final norm, `student_lm_head`
    the LM head; "kld" uses `config.direction`, "ce" the teacher's argmax token.
    """
    if config.last_op == "none":
        return None
    return mean_divergence(
        student_final, student_lm_head, teacher_final, config.last_op, config.direction, config.temperature,
        config.chunk_tokens, config.recompute,
    )


def _ce_chunk_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def mean_next_token_ce(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    recompute: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` [N, V] against `targets` [N], chunked.

    The verbalization step's loss (over the model's full vocabulary, temperature 1).
    """
    n = int(hidden.shape[0])
    if n != int(targets.shape[0]):
        raise ValueError(f"{n} hidden states but {int(targets.shape[0])} targets")
    if n == 0:
        return hidden.sum() * 0.0
    use_checkpoint = recompute and _needs_graph(hidden, head)
    total: torch.Tensor | None = None
    for start in range(0, n, chunk_tokens):
        end = min(n, start + chunk_tokens)
        args = (hidden[start:end], head, targets[start:end])
        part = checkpoint(_ce_chunk_sum, *args, use_reentrant=False) if use_checkpoint else _ce_chunk_sum(*args)
        total = part if total is None else total + part
    assert total is not None
    return total / n
