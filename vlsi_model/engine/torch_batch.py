"""Batched greedy decoding for the torch backend: several answers advance one token per step together.

Why: decoding a token reads every weight of the language model once, whatever the batch, so on a
memory-bound robot computer B concurrent answers (several cameras, several clients) decode in about
the time of one; and at nano size one step's Python and dispatch overhead is paid once for all.

How: each answer is prefilled alone (its own image and prompt length), then their KV caches are
left-padded to one length and stacked; an additive attention mask hides the padding (exp of the
dtype's minimum is exactly 0 in the softmax, so a padded sequence sees what it saw alone); each
step feeds every live sequence's last token at its own M-RoPE position. A sequence that stops
(stop token, its max_new_tokens, its cancel) leaves the batch, whose tensors shrink with it. The
stopping rules are `greedy_tokens`'s. Greedy tokens equal the one-at-a-time answers up to float
reassociation in batched matmuls (a near-tie could flip; on CPU tested token for token on tiny
Qwen2-VL / Qwen2.5-VL and on the shipped student; on CUDA the masked batch may take another
attention kernel than the unmasked single step: not tested here). No streaming: answers with
`on_token` run alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlsi_model.engine.base import AnswerResult


class BatchDecoderStep(nn.Module):
    """One decode step for B sequences: forward(inputs_embeds [B, 1, hidden], position_ids [3, B, 1],
    attention_mask [B, 1, 1, T] (additive: 0 attend, dtype minimum masked), *past [B, kv, T-1, d])
    -> (next token ids [B], *present [B, kv, T, d]). The model's own modules, as `DecoderStep`
    runs them, with the mask the Hugging Face attention takes for padding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from vlsi_model.engine.torch_engine import _TensorCache

        cache = _TensorCache(past)
        hidden = inputs_embeds
        position_embeddings = self.lm.rotary_emb(hidden, position_ids)
        for layer in self.lm.layers:
            hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                           position_ids=None, cache=cache, use_cache=True)
        hidden = self.lm.norm(hidden)
        next_ids = self.lm_head(hidden[:, -1, :]).float().argmax(dim=-1)
        return (next_ids, *cache.present)


@dataclass
class BatchedAnswer:
    """One answer in the batch: its prefill's result and state, and its decode limits."""

    result: AnswerResult
    first_id: int
    kv: list[torch.Tensor]  # every layer's key and value, [1, kv_heads, P, head_dim]
    seq_len: int  # prompt tokens (the first answer token's position is seq_len + rope_delta)
    rope_delta: int
    max_new_tokens: int
    cancel: threading.Event | None = None
    tokens: list[int] | None = None
    finished_s: float = 0.0  # time.perf_counter() when it left the batch
    index: int = 0  # its question's place in the caller's list


def _stack_left_padded(caches: list[list[torch.Tensor]], dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's KV of B sequences left-padded to the longest and stacked on the batch axis,
    and the additive mask [B, 1, 1, P_max] that hides the padding."""
    longest = max(kv[0].shape[2] for kv in caches)
    stacked = []
    for layer in range(len(caches[0])):
        parts = []
        for kv in caches:
            t = kv[layer]
            pad = longest - t.shape[2]
            parts.append(torch.cat([t.new_zeros((*t.shape[:2], pad, t.shape[3])), t], dim=2) if pad else t)
        stacked.append(torch.cat(parts, dim=0))
    mask = torch.zeros((len(caches), 1, 1, longest), dtype=dtype, device=caches[0][0].device)
    for i, kv in enumerate(caches):
        mask[i, ..., :longest - kv[0].shape[2]] = torch.finfo(dtype).min
    return stacked, mask


def _takes(s: BatchedAnswer, token: int, stop_token_ids: frozenset[int], now: float) -> bool:
    """Add `token` to `s` as `greedy_tokens` would; whether `s` decodes on (False: a stop token, its
    cancel, or its max_new_tokens ended it, at `now`)."""
    s.finished_s = now
    if token in stop_token_ids:
        return False
    s.tokens.append(token)
    if s.cancel is not None and s.cancel.is_set():
        s.result.cancelled = True
        return False
    return len(s.tokens) < s.max_new_tokens


def decode_batch(step: Callable[..., tuple[torch.Tensor, ...]], embed_tokens: nn.Module,
                 sequences: list[BatchedAnswer], stop_token_ids: frozenset[int],
                 on_finished: Callable[[BatchedAnswer], None] | None = None) -> None:
    """Greedy-decode `sequences` together with `step` (a `BatchDecoderStep`, traced or not);
    fills each one's `tokens` and its result's `cancelled`. Same stopping rules as `greedy_tokens`.
    `on_finished(s)` runs as each sequence leaves the batch (every one does, unless `step` or
    `on_finished` raises), so a short answer can be delivered while the long ones decode on."""

    def stays(s: BatchedAnswer, token: int, now: float) -> bool:
        if _takes(s, token, stop_token_ids, now):
            return True
        if on_finished is not None:
            on_finished(s)
        return False

    now = time.perf_counter()
    for s in sequences:
        s.tokens = []
    live = [s for s in sequences if stays(s, s.first_id, now)]  # the prefill's token
    if not live:
        return
    dtype = embed_tokens.weight.dtype
    device = embed_tokens.weight.device
    kv, mask = _stack_left_padded([s.kv for s in live], dtype)
    for s in sequences:
        s.kv = []  # the stacked copy holds them now
    while live:
        ids = torch.tensor([[s.tokens[-1]] for s in live], dtype=torch.long, device=device)
        pos = torch.tensor([s.seq_len + len(s.tokens) - 1 + s.rope_delta for s in live], dtype=torch.long,
                           device=device).view(1, -1, 1).expand(3, -1, -1)
        mask = torch.cat([mask, mask.new_zeros((len(live), 1, 1, 1))], dim=-1)
        with torch.jit.optimized_execution(False):
            out = step(embed_tokens(ids), pos, mask, *kv)
        next_ids, kv = out[0].tolist(), list(out[1:])
        now = time.perf_counter()
        keep = [i for i, (s, token) in enumerate(zip(live, next_ids, strict=True)) if stays(s, int(token), now)]
        if len(keep) < len(live):
            if not keep:
                return
            index = torch.tensor(keep, device=device)
            kv = [t.index_select(0, index) for t in kv]
            mask = mask.index_select(0, index)
            live = [live[i] for i in keep]


def example_batch_step(empty_past: list[torch.Tensor], hidden: int, batch: int, past_len: int,
                       seed: int) -> list[Any]:
    """Inputs of a batched decode step (seeded random values, the first sequence padded by 2):
    what `trace_decoder_step` traces and checks `BatchDecoderStep` on."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device = empty_past[0].dtype, empty_past[0].device
    embeds = torch.randn(batch, 1, hidden, generator=gen).to(device, dtype)
    pos = torch.full((3, batch, 1), past_len, dtype=torch.long, device=device)
    mask = torch.zeros((batch, 1, 1, past_len + 1), dtype=dtype, device=device)
    mask[0, ..., :2] = torch.finfo(dtype).min
    past = [torch.randn((batch, e.shape[1], past_len, e.shape[3]), generator=gen).to(device, dtype)
            for e in empty_past]
    return [embeds, pos, mask, *past]
