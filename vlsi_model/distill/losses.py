"""Divergences between verbalized distributions, computed in chunks of tokens.

The expensive object in VLsI is the vocabulary-sized distribution: every target layer of
both models is projected to the ~152k-token vocabulary for every response token. Held at
once, S + T targets x N tokens x V floats do not fit any GPU. Here every quantity is
computed over chunks of `chunk_tokens` tokens, one (student target, teacher target) pair
at a time, and the loss that needs gradients recomputes each chunk in the backward pass
(`torch.utils.checkpoint`, non-reentrant), so the autograd graph keeps only the [N, d]
hidden states, never a [N, V] tensor. Peak memory is a few chunk x V tensors whatever the
number of tokens and targets (`test_distill_components.py` measures it).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


def dense_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, op: str, direction: str = "forward"
) -> torch.Tensor:
    """[c] per-token divergence between two [c, V] log-probability tensors (see the module docstring)."""
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"shape mismatch {tuple(student_logp.shape)} vs {tuple(teacher_logp.shape)}")
    if op == "ce":
        target = teacher_logp.argmax(dim=-1, keepdim=True)
        return -student_logp.gather(-1, target).squeeze(-1)
    if op == "l2":
        return (student_logp.exp() - teacher_logp.exp()).pow(2).sum(-1)
    if op != "kld":
        raise ValueError(f"unknown op {op!r}")
    if direction == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if direction == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if direction == "symmetric":
        diff = teacher_logp - student_logp
        return 0.5 * ((teacher_logp.exp() - student_logp.exp()) * diff).sum(-1)
    raise ValueError(f"unknown direction {direction!r}")


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
    """Full [c, V] teacher log-probs."""

    logp: torch.Tensor

    def divergence(self, student_logp: torch.Tensor, op: str, direction: str) -> torch.Tensor:
        return dense_divergence(student_logp, self.logp.to(student_logp.device), op, direction)


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


def mean_divergence(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher: TeacherTarget,
    op: str = "kld",
    direction: str = "forward",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    recompute: bool = True,
) -> torch.Tensor:
    """Mean over N tokens of the divergence between `student_head(student_hidden)` and `teacher`.

    student_hidden: [N, d_s] (with gradients); student_head: hidden -> logits (a
    `VerbalizedHead` for an intermediate target, the LM head for the final layer, whose
    input is already normed). With `recompute` (default) every chunk is wrapped in a
    non-reentrant `torch.utils.checkpoint`, so only the chunk's [c, d_s] input is kept for
    backward and its vocabulary-sized tensors are rebuilt there, one chunk at a time.
    With no tokens, returns a zero that is still connected to the graph (backward works).
    """
    n = int(student_hidden.shape[0])
    if n != teacher.num_tokens:
        raise ValueError(f"student has {n} tokens, teacher {teacher.num_tokens}")
    if n == 0:
        return student_hidden.sum() * 0.0
    vocab = _shared_vocab(student_head, teacher)
    use_checkpoint = recompute and _needs_graph(student_hidden, student_head)
    total: torch.Tensor | None = None
    for start in range(0, n, chunk_tokens):
        end = min(n, start + chunk_tokens)
        args = (student_hidden[start:end], student_head, teacher, start, end, vocab, op, direction, temperature)
        part = checkpoint(_chunk_sum, *args, use_reentrant=False) if use_checkpoint else _chunk_sum(*args)
        total = part if total is None else total + part
    assert total is not None
    return total / n


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
    whose search windows cannot reach them skips that work). Loop order: chunk -> teacher
    target -> student target, so each teacher projection is computed once per chunk and
    only two [chunk, V] distributions are alive at a time; the price is that a student
    target is projected once per teacher target it is compared with (the student's head
    is the narrower, cheaper one).
    """
    s_count, t_count = len(student_hidden), len(teachers)
    if len(student_heads) != s_count:
        raise ValueError("one head per student target")
    if s_count == 0 or t_count == 0:
        return torch.zeros(s_count, t_count)
    n = int(student_hidden[0].shape[0])
    if any(int(h.shape[0]) != n for h in student_hidden) or any(t.num_tokens != n for t in teachers):
        raise ValueError("all targets must cover the same tokens")
    if needed is None:
        needed = torch.ones(s_count, t_count, dtype=torch.bool)
    if tuple(needed.shape) != (s_count, t_count):
        raise ValueError(f"needed has shape {tuple(needed.shape)}, expected {(s_count, t_count)}")
    out = torch.full((s_count, t_count), float("nan"))
    out[needed] = 0.0
    if n == 0:
        return out
    vocab = min(min(head_vocab_size(h) for h in student_heads), min(t.vocab_size for t in teachers))
    # Accumulated on the device: one transfer at the end instead of a sync per (chunk, pair).
    sums = torch.zeros(s_count, t_count, dtype=torch.float64, device=student_hidden[0].device)
    for start in range(0, n, chunk_tokens):
        end = min(n, start + chunk_tokens)
        for t, teacher in enumerate(teachers):
            rows = [s for s in range(s_count) if needed[s, t]]
            if not rows:
                continue
            tchunk = teacher.chunk(start, end, vocab, temperature)
            for s in rows:
                student_logp = log_probs(student_heads[s](student_hidden[s][start:end]), vocab, temperature)
                sums[s, t] += tchunk.divergence(student_logp, op, direction).double().sum()
    out[needed] = (sums.cpu() / n).float()[needed]
    return out


def pair_loss(
    student_hidden: Sequence[torch.Tensor],
    student_heads: Sequence[nn.Module],
    teachers: Sequence[TeacherTarget],
    pairs: Sequence[tuple[int, int]],
    config: LossConfig,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum over `pairs` (s, t) of the mean divergence, per-pair terms) WITH gradients.

    Each pair is its own chunked, recomputed reduction, so during backward only one
    (chunk, pair)'s vocabulary tensors exist at a time.
    """
    if not pairs:
        raise ValueError("no pairs")
    terms = [
        mean_divergence(
            student_hidden[s], student_heads[s], teachers[t], config.intermediate_op, config.direction,
            config.temperature, config.chunk_tokens, config.recompute,
        )
        for s, t in pairs
    ]
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
