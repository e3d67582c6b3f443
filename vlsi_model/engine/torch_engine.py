"""PyTorch backend: Hugging Face Qwen2-VL / Qwen2.5-VL modules driven by our own greedy loop.

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
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from vlsi_model.engine.base import AnswerResult, EngineError, TokenCallback
from vlsi_model.prompting import DEFAULT_MAX_QUESTION_CHARS, build_inputs


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _stream_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """Text of the tokens so far, without a trailing half-decoded UTF-8 character (byte-level BPE)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd").strip()


class TorchEngine:
    """`Engine` on PyTorch (CPU or CUDA) for Hugging Face Qwen2-VL and Qwen2.5-VL models.

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
    ) -> None:
        """Wrap an already loaded model. `num_threads` sets torch's (process-wide) intra-op threads."""
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

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        num_threads: int | None = None,
        max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder: bool | None = None,
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
        model = self.model
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = build_inputs(
            self.tokenizer, self.image_processor, image, question, max_question_chars=self.max_question_chars
        )
        result = AnswerResult(text="")
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            result.total_ms = _ms(t_start)
            return result

        dev = self.device
        input_ids = inputs["input_ids"].to(dev)
        grid_thw = inputs["image_grid_thw"].to(dev)
        with torch.inference_mode():
            # --- vision tower -------------------------------------------------------------
            t0 = time.perf_counter()
            image_embeds = self._vision(inputs["pixel_values"].to(dev), grid_thw)
            self._sync()
            result.vision_ms = _ms(t0)

            # --- prefill ------------------------------------------------------------------
            t0 = time.perf_counter()
            lm = model.model.language_model
            embeds = model.get_input_embeddings()(input_ids)
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
            cache = DynamicCache(config=model.config)
            out = lm(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True)
            next_id = self._greedy(model, out.last_hidden_state)
            self._sync()
            result.prefill_ms = _ms(t0)

            # --- decode -------------------------------------------------------------------
            t0 = time.perf_counter()
            seq_len = input_ids.shape[1]
            rope_delta = rope_deltas.to(dev).view(1, 1, 1)
            tokens: list[int] = []
            while True:
                if next_id in self.stop_token_ids:
                    break
                tokens.append(next_id)
                stop = False
                if on_token is not None:
                    text = _stream_text(self.tokenizer, tokens)
                    stop = on_token(text, len(tokens)) is False
                if stop or (cancel is not None and cancel.is_set()):
                    result.cancelled = True
                    break
                if len(tokens) >= max_new_tokens:
                    break
                step_ids = torch.tensor([[next_id]], dtype=torch.long, device=dev)
                pos = torch.full((3, 1, 1), seq_len + len(tokens) - 1, dtype=torch.long, device=dev) + rope_delta
                out = lm(
                    inputs_embeds=model.get_input_embeddings()(step_ids),
                    position_ids=pos,
                    cache=cache,
                    use_cache=True,
                )
                next_id = self._greedy(model, out.last_hidden_state)
            self._sync()
            result.decode_ms = _ms(t0)

        result.token_ids = tokens
        result.text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        result.total_ms = _ms(t_start)
        return result

    def warmup(self, width: int = 112, height: int = 112, max_new_tokens: int = 2) -> AnswerResult:
        """Answer one throw-away request so the first real one does not pay torch's first-call cost.

        On CPU the first answer of a process is ~2-3x slower (allocator, kernel selection);
        a server should call this once after loading, before taking requests.
        """
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        return self.answer(image, "What is in the image?", max_new_tokens=max_new_tokens)

    def _vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged image embeddings [tokens, hidden] from the model's vision tower."""
        feats = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        pooled = feats.pooler_output
        return torch.cat(list(pooled), dim=0) if isinstance(pooled, (tuple, list)) else pooled

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
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
