"""PyTorch backend: Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL modules driven by our own greedy loop.

Why one file of ~620 lines: one backend is one file (as onnxruntime_engine and tensorrt_engine
are); its vision, prefill and decode stages share the model state and the timing split.

Why not `model.generate`: the ROS node and `vlsi bench` need the latency split into vision
tower, prefill and decode, a callback after every token (action feedback, streaming) and
cancellation between tokens; `generate` offers none of these cleanly. The loop below uses
the model's own pieces (vision tower, `get_rope_index`, text decoder, lm_head, KV cache) so
it produces exactly the tokens `generate(do_sample=False)` produces (tested), and it is the
reference the ONNX Runtime / TensorRT backends reproduce stage by stage:

- vision: pixel patches -> merged image embeddings (`get_image_features`);
- prefill: token embeddings with image embeddings scattered at the `<|image_pad|>`
  positions, 3-D M-RoPE position ids from `get_rope_index`, one decoder pass filling the
  KV cache; its last logits give the first token;
- decode: one token per step; its M-RoPE position is (tokens so far + rope_delta) on all
  three axes, rope_delta being how far the image's compact 2-D positions shifted the text.

Qwen3-VL (DeepStack): its vision tower also returns features of some intermediate blocks,
which the text model adds to the outputs of its first decoder layers at the image tokens.
`DecoderStep` calls the layers itself and would skip that, so a Qwen3-VL prefill runs the
Hugging Face text model (`language_model(inputs_embeds=..., visual_pos_masks=...,
deepstack_visual_embeds=...)`, with the [text; t; h; w] position ids `generate` passes) into a
`DynamicCache`; decode steps carry no image tokens, so they run `DecoderStep` (traced) on
that cache's tensors as for the other models. Same tokens as `generate`, tested.

Speed (the model's modules, none of their Python): prefill and decode run `DecoderStep`,
which calls the model's own rotary embedding, decoder layers, final norm and lm_head with
exactly the arguments the Hugging Face text model gives them (no padding: attention_mask
None, sdpa's causal / full attention) and keeps the KV cache as plain tensors, so it computes
bit for bit what `generate` computes. The decode step is traced once per engine
(`torch.jit.trace` + `torch.jit.freeze`, which keeps every aten op and shares the model's
weights) and run without the JIT's optimising executor; that removes the per-op Python of
the forward (about 3x fewer milliseconds per token on a small model). The trace is checked
against the untraced step at two cache lengths when it is built; if tracing fails or
differs, the untraced `DecoderStep` is used (logged). Models whose attention is not sdpa
with full (non-sliding) layers use the Hugging Face forward with a `DynamicCache`.

Memory: TorchScript keeps part of every trace in process-wide state that is never freed
(measured with the default student: ~13 MB per traced engine, ~3.5 MB of it the trace
itself, the rest freezing and the first runs; nothing of the model survives a closed
engine otherwise). A server that reloads its model on every lifecycle configure would grow
without bound, so a process traces at most `MAX_TRACED_ENGINES_PER_PROCESS` engines; later
ones decode untraced (same tokens, slower; logged once).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from vlsi_model.engine.base import (
    AnswerResult,
    EngineError,
    TokenCallback,
    greedy_tokens,
    per_question,
    shared_prefix_length,
    split_shared_time,
)
from vlsi_model.prompting import DEFAULT_MAX_QUESTION_CHARS, build_inputs

log = logging.getLogger(__name__)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _stream_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """Text of the tokens so far, without a trailing half-decoded UTF-8 character (byte-level BPE)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd").strip()


class _TensorCache:
    """The part of transformers' `Cache` the attention layers use (`update`), over plain tensors.

    `past` holds (key, value) of every layer in order ([1, kv_heads, P, head_dim], P may be 0);
    `update` concatenates exactly as `DynamicLayer.update` does and records the results in
    `present`. Plain tensors in and out are what makes the step traceable.
    """

    def __init__(self, past: Sequence[torch.Tensor]) -> None:
        self.past = past
        self.present: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.past[2 * layer_idx], key_states], dim=-2)
        values = torch.cat([self.past[2 * layer_idx + 1], value_states], dim=-2)
        self.present += [keys, values]
        return keys, values


class DecoderStep(nn.Module):
    """Text decoder + lm_head of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model for greedy decoding (prefill or one step).

    forward(inputs_embeds [1, S, hidden], position_ids [3, 1, S], *past) -> (next token id [1],
    *present): `past` / `present` are every layer's key and value ([1, kv_heads, P, head_dim],
    P = 0 for the prefill; present has P + S). The model's own modules run with the arguments
    the Hugging Face text model passes them when there is no padding, so the result is the
    one `generate` gets (see `fast_path_unsupported` for when that holds). Unlike
    `export.graphs.DecoderGraph` (same idea, but re-implemented attention for a static ONNX
    graph) nothing is re-implemented here. Shares the model's weights.
    No DeepStack: for Qwen3-VL it serves decode steps only (they hold no image tokens).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _TensorCache(past)
        hidden = inputs_embeds
        position_embeddings = self.lm.rotary_emb(hidden, position_ids)
        for layer in self.lm.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, position_ids=None,
                           cache=cache, use_cache=True)
        hidden = self.lm.norm(hidden)
        # float32 argmax like generate's greedy search (it upcasts the last logits first).
        next_id = self.lm_head(hidden[:, -1, :]).float().argmax(dim=-1)
        return (next_id, *cache.present)


def fast_path_unsupported(model: PreTrainedModel) -> str | None:
    """Why `DecoderStep` would not reproduce the Hugging Face forward for `model`, or None.

    It passes attention_mask=None to every layer, which is what the text model passes with
    sdpa attention, full-attention layers and no padding; eager attention (an explicit 4-D
    mask) or sliding-window layers need the masks the Hugging Face forward builds.
    """
    cfg = model.model.language_model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} (the fast path needs sdpa)"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (the fast path needs full attention in every layer)"
    return None


MAX_TRACED_ENGINES_PER_PROCESS = 8
_traced_engines = 0
_traced_engines_lock = threading.Lock()


def claim_trace_slot() -> bool:
    """Whether this process may trace one more engine's decode step (see the module docstring)."""
    global _traced_engines
    with _traced_engines_lock:
        if _traced_engines >= MAX_TRACED_ENGINES_PER_PROCESS:
            return False
        _traced_engines += 1
        if _traced_engines == MAX_TRACED_ENGINES_PER_PROCESS:
            log.warning("torch backend: %d engines traced in this process; TorchScript keeps ~13 MB of each for "
                        "the life of the process, so later engines decode untraced", _traced_engines)
        return True


def trace_decoder_step(step: DecoderStep, example: Sequence[torch.Tensor],
                       check: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    """`step` traced on `example` (a one-token decode step) and frozen, checked bit for bit against
    the untraced step on `example` and on `check` (a different cache length). Raises RuntimeError
    when they differ; tracing errors propagate."""
    with warnings.catch_warnings():
        # TracerWarnings (Python bools from shapes: fixed for a one-token step) and
        # TorchScript's deprecation notice.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(step, tuple(example), check_trace=False)
        # optimize_numerics=False: only passes that keep every value (no conv folding); the
        # weights become constants that share the model's storage (no copy).
        frozen = torch.jit.freeze(traced.eval(), optimize_numerics=False)
    for inputs in (example, check):
        with torch.jit.optimized_execution(False):
            got = frozen(*inputs)
        want = step(*inputs)
        if len(got) != len(want) or not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
            raise RuntimeError(f"traced decode step differs from the model at cache length {inputs[-1].shape[2]}")
    return frozen


def uses_deepstack(model: PreTrainedModel) -> bool:
    """Whether the model adds vision features inside its text decoder (Qwen3-VL's DeepStack), so a
    prefill with image tokens must run the Hugging Face text model rather than `DecoderStep`."""
    vision = getattr(model.config, "vision_config", None)
    return bool(getattr(vision, "deepstack_visual_indexes", None))


class TorchEngine:
    """`Engine` on PyTorch (CPU or CUDA) for Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL models.

    Not thread-safe (callers serialise `answer`, see `Engine`).
    """

    backend = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        model_name: str = "",
        num_threads: int | None = None,
        max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder: bool = False,
        trace_decoder: bool = True,
    ) -> None:
        """Wrap an already loaded model. `num_threads` sets torch's (process-wide) intra-op threads.

        `trace_decoder=False` decodes with the untraced `DecoderStep` (same tokens, slower);
        the trace is otherwise built on the first answer (or `warmup`).
        """
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError("num_threads must be >= 1")
            torch.set_num_threads(num_threads)
        self._model: PreTrainedModel | None = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_name = model_name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
        self.max_question_chars = max_question_chars
        self.is_placeholder = is_placeholder
        self.device = next(model.parameters()).device
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.stop_token_ids = self._stop_ids(model, tokenizer)
        self._deepstack = uses_deepstack(model)
        # Decoder: DecoderStep (prefill, and decode unless traced) or None = the Hugging Face forward.
        why_not = fast_path_unsupported(model)
        if why_not is not None:
            log.info("torch backend: decoding through the Hugging Face forward: %s", why_not)
        self._step: DecoderStep | None = DecoderStep(model).eval() if why_not is None else None
        self._trace_decoder = trace_decoder
        self._decode_fn: Any = None  # the traced step, or self._step; built on first use
        self._batch_fn: Any = None  # torch_batch.BatchDecoderStep, traced or not; built by answer_batch
        self._empty_past: list[torch.Tensor] = []
        if self._step is not None:
            lm = model.model.language_model
            attn = lm.layers[0].self_attn
            shape = (1, int(lm.config.num_key_value_heads), 0, int(attn.head_dim))
            self._empty_past = [torch.zeros(shape, dtype=attn.k_proj.weight.dtype, device=self.device)
                                for _ in range(2 * len(lm.layers))]

    @property
    def supports_batch(self) -> bool:
        """Whether `answer_batch` really decodes together (the fast path, `fast_path_unsupported`);
        the serving worker batches only then."""
        return self._step is not None

    @property
    def decode_mode(self) -> str:
        """How decode steps run: "traced", "untraced" (DecoderStep), "hf" (Hugging Face forward),
        "pending" before the first answer builds the trace, or "closed"."""
        if self._model is None:
            return "closed"
        if self._step is None:
            return "hf"
        if self._decode_fn is None:
            return "pending"
        return "untraced" if self._decode_fn is self._step else "traced"

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        num_threads: int | None = None,
        max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder: bool | None = None,
        trace_decoder: bool = True,
    ) -> TorchEngine:
        """Load a Hugging Face model directory (see `vlsi_model.checkpoint.load_model_dir`)."""
        from vlsi_model.checkpoint import load_model_dir, read_metadata

        if num_threads is not None:
            torch.set_num_threads(num_threads)  # before loading: loading runs torch ops too
        model, tokenizer, image_processor = load_model_dir(path, device=device, dtype=dtype)
        if is_placeholder is None:
            is_placeholder = bool(read_metadata(path).get("placeholder", False))
        return cls(
            model,
            tokenizer,
            image_processor,
            model_name=Path(path).name,
            num_threads=num_threads,
            max_question_chars=max_question_chars,
            is_placeholder=is_placeholder,
            trace_decoder=trace_decoder,
        )

    @staticmethod
    def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        """Stop on the generation config's eos ids (as generate does) and always on <|im_end|>."""
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = model.config.get_text_config().eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != tokenizer.unk_token_id:
            ids.add(int(im_end))
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            raise EngineError("engine is closed")
        return self._model

    def answer(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int = 32,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> AnswerResult:
        """Greedy answer about `image` (H x W x 3 uint8 RGB) to `question`.

        `token_ids` holds the answer tokens without the stop token; `decode_ms` covers every
        step after the prefill, including the one that produced the stop token. Preprocessing
        (resize, tokenize) counts only in `total_ms`.
        """
        t_start = time.perf_counter()
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        with torch.inference_mode():
            self._ensure_decode_fn()  # first answer only: builds the trace (counts in total_ms alone)
            result, state = self._prefilled(image, question, cancel)
            if state is not None:
                self._decode_answer(result, *state, max_new_tokens, on_token, cancel)
        result.total_ms = _ms(t_start)
        return result

    def _prefilled(self, image: np.ndarray, question: str, cancel: threading.Event | None
                   ) -> tuple[AnswerResult, tuple[int, Any, int, torch.Tensor] | None]:
        """Preprocess, vision tower and prefill of one question: (result with vision_ms and
        prefill_ms, (first token, KV cache, prompt length, rope_deltas)), or (a cancelled result,
        None) when `cancel` was set before it started. Call under `torch.inference_mode()`."""
        model = self.model
        inputs = build_inputs(
            self.tokenizer, self.image_processor, image, question, max_question_chars=self.max_question_chars
        )
        result = AnswerResult(text="")
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            return result, None
        dev = self.device
        input_ids = inputs["input_ids"].to(dev)
        grid_thw = inputs["image_grid_thw"].to(dev)
        # --- vision tower -------------------------------------------------------------
        t0 = time.perf_counter()
        image_embeds, deepstack = self._vision(inputs["pixel_values"].to(dev), grid_thw)
        self._sync()
        result.vision_ms = _ms(t0)
        # --- prefill ------------------------------------------------------------------
        t0 = time.perf_counter()
        embed_tokens = model.get_input_embeddings()
        embeds = embed_tokens(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) != image_embeds.shape[0]:
            raise EngineError(
                f"{int(image_mask.sum())} image tokens but {image_embeds.shape[0]} image embeddings"
            )
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        position_ids, rope_deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"].to(dev),
            image_grid_thw=grid_thw,
        )
        if deepstack is None:
            next_id, kv = self._prefill(embeds, position_ids)
        else:
            next_id, kv = self._prefill_deepstack(embeds, position_ids, image_mask[..., 0], deepstack)
        self._sync()
        result.prefill_ms = _ms(t0)
        return result, (next_id, kv, input_ids.shape[1], rope_deltas)

    def answer_batch(self, images: list[np.ndarray], questions: list[str], max_new_tokens: list[int] | int = 32,
                     cancels: list[threading.Event | None] | None = None,
                     on_answer: Callable[[int, AnswerResult], None] | None = None) -> list[AnswerResult | Exception]:
        """Greedy answers to questions about different images, decoded together (`torch_batch`).

        Each question is preprocessed, encoded and prefilled alone; then every answer advances one
        token per step in one batch. A question that fails (bad image, too long) gets its
        exception in its place and the others go on. Each answer's `decode_ms` runs from the
        batch's first step until it left the batch, and `total_ms` from this call's start (the
        other questions' preprocessing and prefills included: what its requester waited).
        `on_answer(index, result)` runs as each decoded answer leaves the batch, complete (tokens,
        text, times), so a caller can deliver a short answer before the long ones end; errors come
        only in the returned list, and so may answers cancelled before their prefill.
        Without the fast decode path (`supports_batch` False) the answers run one after another."""
        from vlsi_model.engine.torch_batch import BatchedAnswer, decode_batch

        limits, cancels = per_question(len(questions), max_new_tokens, cancels, "answer_batch")
        if len(images) != len(questions):
            raise EngineError("answer_batch needs one image per question")
        if self._step is None or len(questions) < 2:
            alone: list[AnswerResult | Exception] = []
            for args in zip(images, questions, limits, cancels, strict=True):
                alone.append(self._answer_or_error(*args))
                if on_answer is not None and isinstance(alone[-1], AnswerResult):
                    on_answer(len(alone) - 1, alone[-1])
            return alone
        t_start = time.perf_counter()
        out: list[AnswerResult | Exception] = []
        batch: list[BatchedAnswer] = []
        t0 = t_start

        def finished(item: BatchedAnswer) -> None:
            item.result.token_ids = item.tokens or []
            item.result.text = self.tokenizer.decode(item.result.token_ids, skip_special_tokens=True).strip()
            item.result.decode_ms = (item.finished_s - t0) * 1000.0  # until it left the batch
            item.result.total_ms = (item.finished_s - t_start) * 1000.0
            if on_answer is not None:
                on_answer(item.index, item.result)

        with torch.inference_mode():
            self._ensure_decode_fn()
            self._ensure_batch_fn()
            for image, question, limit, cancel in zip(images, questions, limits, cancels, strict=True):
                try:
                    if limit < 1:
                        raise EngineError(f"max_new_tokens must be >= 1, got {limit}")
                    result, state = self._prefilled(image, question, cancel)
                except Exception as exc:  # noqa: BLE001 - reported to that question alone
                    out.append(exc)
                    continue
                out.append(result)
                if state is not None:
                    next_id, kv, seq_len, rope_deltas = state
                    batch.append(BatchedAnswer(result, next_id, list(kv), seq_len, int(rope_deltas.view(-1)[0]),
                                               limit, cancel, index=len(out) - 1))
            t0 = time.perf_counter()
            decode_batch(self._batch_fn, self.model.get_input_embeddings(), batch, self.stop_token_ids, finished)
            self._sync()
        done = time.perf_counter()
        for result in out:
            if isinstance(result, AnswerResult) and not result.total_ms:
                result.total_ms = (done - t_start) * 1000.0  # cancelled before it started
        return out

    def _answer_or_error(self, image: np.ndarray, question: str, limit: int,
                         cancel: threading.Event | None) -> AnswerResult | Exception:
        try:
            return self.answer(image, question, limit, cancel=cancel)
        except Exception as exc:  # noqa: BLE001 - reported to that question alone
            return exc

    def _decode_answer(self, result: AnswerResult, next_id: int, kv: Any, seq_len: int, rope_deltas: torch.Tensor,
                       max_new_tokens: int, on_token: TokenCallback | None, cancel: threading.Event | None) -> None:
        """The greedy decode loop after a prefill of `seq_len` tokens; fills result's tokens, text, decode_ms."""
        t0 = time.perf_counter()
        dev = self.device
        embed_tokens = self.model.get_input_embeddings()
        rope_delta = rope_deltas.to(dev).view(1, 1, 1)

        def step(last_id: int, n: int) -> int:
            nonlocal kv
            step_ids = torch.tensor([[last_id]], dtype=torch.long, device=dev)
            pos = torch.full((3, 1, 1), seq_len + n - 1, dtype=torch.long, device=dev) + rope_delta
            new_id, kv = self._decode(embed_tokens(step_ids), pos, kv)
            return new_id

        tokens, result.cancelled = greedy_tokens(
            next_id, step, self.stop_token_ids, max_new_tokens,
            lambda ids: _stream_text(self.tokenizer, ids), on_token, cancel)
        self._sync()
        result.decode_ms = _ms(t0)
        result.token_ids = tokens
        result.text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def answer_many(self, image: np.ndarray, questions: list[str], max_new_tokens: list[int] | int = 32,
                    cancels: list[threading.Event | None] | None = None) -> list[AnswerResult]:
        """Greedy answers to several questions about one image, sharing what they have in common.

        The image goes through the vision tower once, and the prompt's common prefix (the turn's
        opening, the image tokens and whatever the questions share after them) is prefilled once;
        each question then prefills only its own remaining tokens on a copy of that KV cache and
        decodes. Answers are the ones `answer` gives (tested token for token). The first result
        carries the shared vision and prefix time; the others their own suffix prefill and decode.
        """
        t_start = time.perf_counter()
        model = self.model
        if not questions:
            return []
        limits, cancels = per_question(len(questions), max_new_tokens, cancels, "answer_many")
        if any(n < 1 for n in limits):
            raise EngineError(f"max_new_tokens must be >= 1, got {limits}")
        prompts = [build_inputs(self.tokenizer, self.image_processor, image, q,
                                max_question_chars=self.max_question_chars) for q in questions]
        if len(questions) == 1:
            return [self.answer(image, questions[0], limits[0], cancel=cancels[0])]
        dev = self.device
        ids = [p["input_ids"][0].tolist() for p in prompts]
        prefix = shared_prefix_length(ids)
        results = [AnswerResult(text="") for _ in questions]
        with torch.inference_mode():
            self._ensure_decode_fn()
            grid_thw = prompts[0]["image_grid_thw"].to(dev)
            t0 = time.perf_counter()
            image_embeds, deepstack = self._vision(prompts[0]["pixel_values"].to(dev), grid_thw)
            self._sync()
            results[0].vision_ms = _ms(t0)
            t0 = time.perf_counter()
            full_ids = torch.tensor([ids[0]], dtype=torch.long, device=dev)
            image_mask = full_ids == self.image_token_id
            if int(image_mask[0, prefix:].sum()):
                raise EngineError("the questions differ before the image tokens: no shared prefix")
            embed_tokens = model.get_input_embeddings()
            embeds = embed_tokens(full_ids[:, :prefix]).masked_scatter(
                image_mask[:, :prefix].unsqueeze(-1), image_embeds.to(embed_tokens.weight.dtype))
            positions = [model.model.get_rope_index(
                p["input_ids"].to(dev), mm_token_type_ids=p["mm_token_type_ids"].to(dev), image_grid_thw=grid_thw)
                for p in prompts]
            prefix_kv = self._prefill_part(embeds, positions[0][0][:, :, :prefix], 0, None,
                                           (image_mask[:, :prefix], deepstack) if deepstack is not None else None)
            self._sync()
            results[0].prefill_ms = _ms(t0)
            for i, (question_ids, (position_ids, rope_deltas)) in enumerate(zip(ids, positions, strict=True)):
                result = results[i]
                if cancels[i] is not None and cancels[i].is_set():
                    result.cancelled = True
                    continue
                t0 = time.perf_counter()
                suffix = torch.tensor([question_ids[prefix:]], dtype=torch.long, device=dev)
                next_id, kv = self._prefill_part(embed_tokens(suffix), position_ids[:, :, prefix:], prefix, prefix_kv,
                                                 None, first_token=True)
                self._sync()
                result.prefill_ms += _ms(t0)
                self._decode_answer(result, next_id, kv, len(question_ids), rope_deltas, limits[i], None, cancels[i])
        split_shared_time(results, _ms(t_start))
        return results

    def _prefill_part(self, embeds: torch.Tensor, position_ids: torch.Tensor, past_len: int, past: Any,
                      deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None, first_token: bool = False) -> Any:
        """Prefill `embeds` (positions `position_ids` [3, 1, S]) after `past_len` cached tokens, through
        the Hugging Face text model, which masks causally on top of a cache. `past` holds the cache as
        layer tensors (k0, v0, k1, ...), copied so it can serve the next question again. Returns the
        layer tensors, or (first token, the cache as `_decode` takes it) with `first_token`.
        Qwen3-VL: `deepstack` (visual mask, features) adds the DeepStack features, and its text
        position row (arange from `past_len`) goes in front of the M-RoPE rows, as generate does."""
        lm = self.model.model.language_model
        cache = DynamicCache(config=lm.config)
        for layer, start in enumerate(range(0, len(past or []), 2)):
            cache.update(past[start], past[start + 1], layer)
        seq = embeds.shape[1]
        kwargs: dict[str, Any] = {}
        if self._deepstack:
            text = torch.arange(past_len, past_len + seq, device=embeds.device).view(1, 1, seq)
            position_ids = torch.cat([text, position_ids], dim=0)
            if deepstack is not None:
                mask, features = deepstack
                kwargs = {"visual_pos_masks": mask, "deepstack_visual_embeds": [f.to(embeds.dtype) for f in features]}
        out = lm(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True, **kwargs)
        kv: list[torch.Tensor] = []
        for layer in cache.layers:
            kv += [layer.keys, layer.values]
        if not first_token:
            return kv
        next_id = self._greedy(self.model, out.last_hidden_state)
        return next_id, (kv if self._step is not None else cache)

    def warmup(self, width: int = 112, height: int = 112, max_new_tokens: int = 2) -> AnswerResult:
        """Answer one throw-away request so the first real one does not pay torch's first-call cost.

        On CPU the first answer of a process is ~2-3x slower (allocator, kernel selection), and
        the first answer of an engine also traces the decode step; a server should call this
        once after loading, before taking requests.
        """
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        return self.answer(image, "What is in the image?", max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ decoder
    def _ensure_batch_fn(self) -> None:
        """Build the batched decode step once: traced like the single one when this engine traced
        that (checked against the untraced step on two batch shapes), else untraced."""
        if self._batch_fn is not None:
            return
        from vlsi_model.engine.torch_batch import BatchDecoderStep, example_batch_step

        step = BatchDecoderStep(self.model).eval()
        self._batch_fn = step
        if self._decode_fn is self._step or self._decode_fn is None:
            return
        hidden = int(self.model.model.language_model.config.hidden_size)
        try:
            self._batch_fn = trace_decoder_step(step, example_batch_step(self._empty_past, hidden, 2, 5, 0),
                                                example_batch_step(self._empty_past, hidden, 3, 9, 1))
        except Exception as exc:  # same tokens untraced, only slower
            log.warning("torch backend: batched decode step not traced (%s: %s)", type(exc).__name__, exc)

    def _ensure_decode_fn(self) -> None:
        """Build the decode step once: the traced DecoderStep, or the untraced one if tracing fails."""
        if self._step is None or self._decode_fn is not None:
            return
        if not self._trace_decoder or not claim_trace_slot():
            self._decode_fn = self._step
            return
        t0 = time.perf_counter()
        try:
            self._decode_fn = trace_decoder_step(self._step, self._example_step(5), self._example_step(9))
        except Exception as exc:  # any tracing problem: fall back to the (slower, same-token) untraced step
            log.warning("torch backend: decode step not traced (%s: %s); decoding untraced", type(exc).__name__, exc)
            self._decode_fn = self._step
        else:
            log.info("torch backend: decode step traced in %.2f s", time.perf_counter() - t0)

    def _example_step(self, past_len: int) -> list[torch.Tensor]:
        """Inputs of a one-token decode step with a `past_len` cache (seeded random values)."""
        lm = self.model.model.language_model
        dtype = self._empty_past[0].dtype
        gen = torch.Generator().manual_seed(past_len)
        embeds = torch.randn(1, 1, int(lm.config.hidden_size), generator=gen).to(self.device, dtype)
        pos = torch.full((3, 1, 1), past_len, dtype=torch.long, device=self.device)
        past = [torch.randn((*e.shape[:2], past_len, e.shape[3]), generator=gen).to(self.device, dtype)
                for e in self._empty_past]
        return [embeds, pos, *past]

    def _prefill(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> tuple[int, Any]:
        """(first token, KV cache) from the prompt's embeddings and M-RoPE positions."""
        if self._step is None:
            cache = DynamicCache(config=self.model.config)
            out = self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, cache=cache,
                                                  use_cache=True)
            return self._greedy(self.model, out.last_hidden_state), cache
        out = self._step(embeds, position_ids, *self._empty_past)
        return int(out[0]), out[1:]

    def _prefill_deepstack(self, embeds: torch.Tensor, position_ids: torch.Tensor, visual_mask: torch.Tensor,
                           deepstack: list[torch.Tensor]) -> tuple[int, Any]:
        """`_prefill` for Qwen3-VL: the Hugging Face text model adds the DeepStack features
        (`deepstack[k]` to layer k's output at `visual_mask`). The position ids get the text row
        generate passes in front ([4, 1, S]: arange, then t, h, w). Returns the KV cache as
        `_decode` takes it: plain tensors for `DecoderStep`, else the DynamicCache."""
        lm = self.model.model.language_model
        seq = embeds.shape[1]
        text_positions = torch.arange(seq, device=embeds.device).view(1, 1, seq)
        cache = DynamicCache(config=lm.config)
        out = lm(inputs_embeds=embeds, position_ids=torch.cat([text_positions, position_ids], dim=0),
                 cache=cache, use_cache=True, visual_pos_masks=visual_mask,
                 deepstack_visual_embeds=[d.to(embeds.dtype) for d in deepstack])
        next_id = self._greedy(self.model, out.last_hidden_state)
        if self._step is None:
            return next_id, cache
        kv: list[torch.Tensor] = []
        for layer in cache.layers:
            kv += [layer.keys, layer.values]
        if len(kv) != len(self._empty_past):
            raise EngineError(f"prefill cache holds {len(kv) // 2} layers, expected {len(self._empty_past) // 2}")
        return next_id, kv

    def _decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, kv: Any) -> tuple[int, Any]:
        """(next token, KV cache) after one token; `kv` is what `_prefill` / the last step returned."""
        if self._step is None:
            out = self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, cache=kv,
                                                  use_cache=True)
            return self._greedy(self.model, out.last_hidden_state), kv
        # The plain graph executor: no profiling runs or re-optimisation as the cache grows
        # (thread-local switch, restored on exit).
        with torch.jit.optimized_execution(False):
            out = self._decode_fn(embeds, position_ids, *kv)
        return int(out[0]), out[1:]

    def _vision(self, pixel_values: torch.Tensor,
                grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(merged image embeddings [tokens, hidden], DeepStack features: one [tokens, hidden] per
        vision block in deepstack_visual_indexes, or None for models without) from the vision tower."""
        feats = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        pooled = feats.pooler_output
        pooled = torch.cat(list(pooled), dim=0) if isinstance(pooled, (tuple, list)) else pooled
        if not self._deepstack:
            return pooled, None
        deepstack = [torch.cat(list(f), dim=0) if isinstance(f, (tuple, list)) else f
                     for f in feats.deepstack_features]
        return pooled, deepstack

    @staticmethod
    def _greedy(model: PreTrainedModel, hidden: torch.Tensor) -> int:
        # float32 argmax like generate's greedy search (it upcasts the last logits first).
        logits = model.lm_head(hidden[:, -1, :]).float()
        return int(logits.argmax(dim=-1).item())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop the model; `answer` raises EngineError afterwards."""
        if self._model is None:
            return
        on_cuda = self.device.type == "cuda"
        self._model = None
        self._step = self._decode_fn = self._batch_fn = None  # they hold the weights (traces as constants)
        self._empty_past = []
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
