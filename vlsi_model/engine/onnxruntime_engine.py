"""ONNX Runtime backend: answers from an export directory (`vlsi export`) with numpy + onnxruntime only.

Why: the PyTorch model costs hundreds of MB of RAM before it answers anything and every
decode step pays PyTorch's per-op dispatch; the exported graphs run as two ONNX Runtime
sessions with fused kernels, and the process never imports torch (tested), so it fits
next to a ROS stack on a small board and is the CPU reference for the TensorRT engines
(same graphs, same inputs, built by `vlsi_model.engine.np_inputs`).

The loop mirrors `TorchEngine` stage by stage (same timings, same tokens, tested):
- vision: numpy patchify + rotary/segment inputs -> `vision.onnx` -> image embeddings;
- prefill: embedding-table lookup with image embeddings scattered at `<|image_pad|>`,
  M-RoPE cos/sin from the 3-D positions, causal bias, `decoder.onnx` with an empty past;
- decode: one token per step with the previous step's present KV as past; the position is
  (tokens so far + rope_delta) on all three M-RoPE axes.
Qwen3-VL: the vision graph also returns the DeepStack features [K, image tokens, hidden]; the
prefill scatters them to the image tokens' positions (`deepstack_embeds` [K, 1, S, hidden],
zeros elsewhere) and a decode step passes zeros (it holds no image token).
The KV cache stays inside ONNX Runtime between steps (IO binding: present outputs are kept
as OrtValues and bound as the next step's past inputs, never copied to numpy).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.engine.base import (
    AnswerResult,
    EngineError,
    ModelLoadError,
    TokenCallback,
    greedy_tokens,
    image_prefix_length,
    per_question,
    split_shared_time,
)
from vlsi_model.engine.np_inputs import (
    ImageConfig,
    PromptBuilder,
    VisionSpec,
    causal_bias,
    deepstack_at_tokens,
    frame_prompts,
    mrope_cos_sin,
    rope_index,
    vision_aux_inputs,
)
from vlsi_model.manifest import find_export_dir, load_manifest, read_metadata_json

DEFAULT_MAX_QUESTION_CHARS = 1000  # = vlsi_model.prompting.DEFAULT_MAX_QUESTION_CHARS (which imports torch)
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class OnnxRuntimeEngine:
    """`Engine` on ONNX Runtime sessions of an export directory. Not thread-safe (see `Engine`)."""

    backend = "onnxruntime"

    def __init__(
        self,
        export_dir: str | Path,
        num_threads: int | None = None,
        providers: list[str] | None = None,
        max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder: bool | None = None,
    ) -> None:
        """Open `export_dir`. `num_threads`: ONNX Runtime intra-op threads per session (default: ORT's)."""
        import onnxruntime as ort

        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        self.export_dir = Path(export_dir)
        self.manifest = m = load_manifest(self.export_dir)
        self.model_name = str(m.get("model_name") or self.export_dir.name)
        self.max_question_chars = max_question_chars
        meta = read_metadata_json(self.export_dir)
        self.is_placeholder = bool(meta.get("placeholder", False)) if is_placeholder is None else is_placeholder

        text, vision, image = m["text"], m["vision"], m["image"]
        self.num_layers = int(text["num_layers"])
        self.num_kv_heads = int(text["num_kv_heads"])
        self.head_dim = int(text["head_dim"])
        self.mrope_section = [int(s) for s in text["mrope_section"]]
        self.mrope_interleaved = bool(text.get("mrope_interleaved", False))
        self.deepstack_layers = int(text.get("deepstack_layers") or 0)
        self.hidden = int(text["hidden_size"])
        self.stop_token_ids = frozenset(int(t) for t in text["stop_token_ids"])
        self.mask_value = float(text["mask_value"])
        self.vision_spec = VisionSpec(
            model_type=m["model_type"],
            merge_size=int(vision["merge_size"]),
            patch_size=int(vision["patch_size"]),
            window_size=int(vision.get("window_size") or 0),
            position_grid=int(vision.get("position_grid") or 0),
        )
        base_cfg = ImageConfig.from_json(self.export_dir / "preprocessor_config.json")
        self.image_config = _image_config_with_limits(base_cfg, image)

        self.prompts = PromptBuilder.from_dir(self.export_dir)
        self.image_token_id = self.prompts.image_token_id
        if self.image_token_id != int(text["image_token_id"]):
            raise ModelLoadError(
                f"{self.export_dir}: tokenizer's <|image_pad|> is id {self.image_token_id} but the export says "
                f"{text['image_token_id']}"
            )
        files = m["files"]
        try:
            # Memory-mapped: only the rows of tokens actually used are paged in (a 2B model's
            # table is ~450 MB in fp16). np.asarray drops the np.memmap subclass, whose Python
            # __getitem__ costs ~0.1 ms per lookup, without copying.
            self.embed_tokens = np.asarray(np.load(self.export_dir / files["embed_tokens"], mmap_mode="r"))
            with np.load(self.export_dir / files["rope"]) as rope:
                self.text_inv_freq = np.array(rope["text_inv_freq"], dtype=np.float32)
                self.vision_inv_freq = np.array(rope["vision_inv_freq"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{self.export_dir}: cannot read embeddings / rotary tables ({exc})") from exc

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if num_threads is not None:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3
        self.providers = providers or ["CPUExecutionProvider"]
        try:
            self._vision = ort.InferenceSession(str(self.export_dir / files["vision"]), opts, providers=self.providers)
            self._decoder = ort.InferenceSession(str(self.export_dir / files["decoder"]), opts,
                                                 providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ModelLoadError(
                f"{self.export_dir}: cannot open the ONNX graphs ({type(exc).__name__}: {exc})"
            ) from exc
        self._vision_inputs = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in self._vision.get_inputs()}
        self._dec_inputs = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in self._decoder.get_inputs()}
        self._dec_outputs = [o.name for o in self._decoder.get_outputs()]
        self.float_dtype = self._dec_inputs["inputs_embeds"]
        self._kv_names = [f"past_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value")]
        self._present_names = [f"present_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value")]
        self._ort = ort
        self._raw_binding = _raw_binding_api(self._decoder)
        self._empty_kv = np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=self.float_dtype)
        self._closed = False
        self._decode_bias = np.zeros((1, 1, 1, 0), dtype=self.float_dtype)
        self._decode_deepstack = np.zeros((self.deepstack_layers, 1, 1, self.hidden), dtype=self.float_dtype)
        self._rope_cache = np.zeros((2, 0, self.head_dim), dtype=np.float32)

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> OnnxRuntimeEngine:
        return cls(path, **kw)

    # ------------------------------------------------------------------ stages
    def prepare(self, image: np.ndarray, question: str) -> dict[str, Any]:
        """Validate and preprocess: prompt ids, pixel patches and the image grid."""
        pixel_values, grid, (ids,) = self._frame_prompts(image, [question])
        return {"input_ids": ids, "pixel_values": pixel_values, "grid_thw": grid}

    def _frame_prompts(self, image: np.ndarray,
                       questions: list[str]) -> tuple[np.ndarray, tuple[int, int, int], list[np.ndarray]]:
        return frame_prompts(image, questions, self.image_config, self.vision_spec.merge_size, self.prompts,
                             self.max_question_chars)

    def run_vision(self, pixel_values: np.ndarray,
                   grid_thw: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(merged image embeddings [tokens, hidden], DeepStack features [K, tokens, hidden] or
        None for models without) from the vision graph."""
        feeds = vision_aux_inputs(grid_thw, self.vision_spec, self.vision_inv_freq)
        feeds["pixel_values"] = pixel_values
        feeds = {k: np.ascontiguousarray(v, dtype=self._vision_inputs[k]) for k, v in feeds.items()
                 if k in self._vision_inputs}
        outputs = self._vision.run(None, feeds)
        return outputs[0], (outputs[1] if self.deepstack_layers else None)

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """inputs_embeds [1, L, hidden]: table lookup with image embeddings at the image tokens."""
        x = np.array(self.embed_tokens[input_ids], dtype=self.float_dtype)
        if image_embeds is not None:
            mask = input_ids == self.image_token_id
            if int(mask.sum()) != image_embeds.shape[0]:
                raise EngineError(f"{int(mask.sum())} image tokens but {image_embeds.shape[0]} image embeddings")
            x[mask] = image_embeds.astype(self.float_dtype)
        return x[None]

    def _rope_rows(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode-step rotary rows: all three M-RoPE axes equal `position`, so a 1-D table suffices."""
        if position >= self._rope_cache.shape[1]:
            n = max(2 * self._rope_cache.shape[1], position + 64)
            pos = np.broadcast_to(np.arange(n, dtype=np.int64), (3, n))
            cos, sin = mrope_cos_sin(pos, self.text_inv_freq, self.mrope_section, interleaved=self.mrope_interleaved)
            self._rope_cache = np.stack([cos[0], sin[0]])  # [2, n, head_dim]
        return (self._rope_cache[0, position][None, None].astype(self.float_dtype),
                self._rope_cache[1, position][None, None].astype(self.float_dtype))

    def prefill(self, input_ids: np.ndarray, inputs_embeds: np.ndarray, grid_thw: tuple[int, int, int],
                deepstack: np.ndarray | None = None) -> tuple[np.ndarray, Any, int]:
        """(last logits [vocab], ORT IO binding holding the present KV, rope_delta). `deepstack`:
        Qwen3-VL's DeepStack features from `run_vision` (required for it, ignored otherwise)."""
        positions, rope_delta = rope_index(input_ids, self.image_token_id, grid_thw, self.vision_spec.merge_size)
        scattered = None
        if self.deepstack_layers:
            scattered = deepstack_at_tokens(input_ids, self.image_token_id, deepstack, self.deepstack_layers,
                                            self.float_dtype)
        outputs = self._extend(inputs_embeds, positions, None, scattered)
        return outputs[0].numpy()[0], outputs, rope_delta

    def _extend(self, inputs_embeds: np.ndarray, positions: np.ndarray, past: list[Any] | None,
                deepstack_embeds: np.ndarray | None = None) -> list[Any]:
        """Run the decoder on `inputs_embeds` [1, S, hidden] at M-RoPE `positions` [3, S] after the
        tokens cached in `past` (a previous run's outputs; None: nothing cached), each new token
        seeing the cache and the new tokens before it: a whole prompt's prefill, or the rest of a
        prompt after a shared prefix. `deepstack_embeds` [K, 1, S, hidden]: Qwen3-VL's features at
        the new tokens (None: zeros, no image token among them)."""
        cos, sin = mrope_cos_sin(positions, self.text_inv_freq, self.mrope_section, self.float_dtype,
                                 interleaved=self.mrope_interleaved)
        seq = inputs_embeds.shape[1]
        past_len = 0 if past is None else past[1].shape()[2]
        feeds = {"inputs_embeds": inputs_embeds, "rotary_cos": cos, "rotary_sin": sin,
                 "attention_bias": causal_bias(seq, past_len, self.float_dtype, self.mask_value)}
        if self.deepstack_layers:
            feeds["deepstack_embeds"] = deepstack_embeds if deepstack_embeds is not None else np.zeros(
                (self.deepstack_layers, 1, seq, self.hidden), dtype=self.float_dtype)
        return self._run_decoder({k: np.ascontiguousarray(v) for k, v in feeds.items()}, past)

    def decode_step(self, token_id: int, position: int, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One token at M-RoPE `position` (all axes) with `past` (the previous outputs) -> (logits, outputs)."""
        embeds = np.array(self.embed_tokens[[token_id]], dtype=self.float_dtype)[None]
        cos, sin = self._rope_rows(position)
        total = past[1].shape()[2] + 1
        if self._decode_bias.shape[3] < total:
            self._decode_bias = np.zeros((1, 1, 1, max(2 * total, 256)), dtype=self.float_dtype)
        feeds = {"inputs_embeds": embeds, "rotary_cos": cos, "rotary_sin": sin,
                 "attention_bias": np.ascontiguousarray(self._decode_bias[..., :total])}
        if self.deepstack_layers:
            feeds["deepstack_embeds"] = self._decode_deepstack
        outputs = self._run_decoder(feeds, past)
        return outputs[0].numpy()[0], outputs

    def _run_decoder(self, feeds: dict[str, np.ndarray], past: list[Any] | None) -> list[Any]:
        """Run decoder.onnx on contiguous numpy `feeds` and the KV of the previous run (`past`: that run's
        outputs; None: an empty cache). Returns the outputs (logits, then the present KV), which stay
        inside ONNX Runtime (IO binding) so the next step binds them without a copy."""
        raw = self._raw_binding
        if raw is not None:  # the same calls one layer down (see _raw_binding_api for why)
            try:
                return self._run_decoder_raw(raw, feeds, past)
            except TypeError:  # an onnxruntime whose internals take other arguments: the wrapper from now on
                self._raw_binding = None
        binding = self._decoder.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for i, name in enumerate(self._kv_names):
            if past is None:
                binding.bind_cpu_input(name, self._empty_kv)
            else:  # (a pybind OrtValue when the raw path gave up mid-answer: wrapped)
                value = past[i + 1]
                binding.bind_ortvalue_input(name, value if hasattr(value, "_ortvalue") else self._ort.OrtValue(value))
        for name in self._dec_outputs:
            binding.bind_output(name, "cpu")
        self._decoder.run_with_iobinding(binding)
        return binding.get_outputs()

    def _run_decoder_raw(self, raw: _RawBinding, feeds: dict[str, np.ndarray], past: list[Any] | None) -> list[Any]:
        """`_run_decoder` through onnxruntime's pybind binding (the same calls as its wrapper makes).
        The numpy inputs are read in place: `feeds` (held by the caller) keeps them alive for the run."""
        binding = raw.binding_type(self._decoder._sess)
        for name, value in feeds.items():
            binding.bind_input(name, value)
        if past is None:
            for name in self._kv_names:
                binding.bind_input(name, self._empty_kv)
        else:
            for name, value in zip(self._kv_names, past[1:], strict=True):
                binding.bind_ortvalue_input(name, value)
        for name in self._dec_outputs:
            binding.bind_output(name, raw.cpu)
        self._decoder._sess.run_with_iobinding(binding, None)
        outputs = binding.get_outputs()
        return [outputs[i] for i in range(len(outputs))]

    # ------------------------------------------------------------------ Engine
    def answer(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int = 32,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> AnswerResult:
        """Greedy answer about `image` (H x W x 3 uint8 RGB) to `question` (same contract as TorchEngine)."""
        t_start = time.perf_counter()
        if self._closed:
            raise EngineError("engine is closed")
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = self.prepare(image, question)
        result = AnswerResult(text="")
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            result.total_ms = _ms(t_start)
            return result
        try:
            t0 = time.perf_counter()
            image_embeds, deepstack = self.run_vision(inputs["pixel_values"], inputs["grid_thw"])
            result.vision_ms = _ms(t0)

            t0 = time.perf_counter()
            ids = inputs["input_ids"]
            logits, past, rope_delta = self.prefill(ids, self.embed(ids, image_embeds), inputs["grid_thw"],
                                                    deepstack)
            next_id = int(np.argmax(logits))
            result.prefill_ms = _ms(t0)

            self._decode(result, next_id, past, len(ids), rope_delta, max_new_tokens, on_token, cancel)
        except EngineError:
            raise
        except Exception as exc:  # an onnxruntime failure mid-request must not look like a crash of the caller
            raise EngineError(f"onnxruntime failed: {type(exc).__name__}: {exc}") from exc
        result.total_ms = _ms(t_start)
        return result

    def _decode(self, result: AnswerResult, first_id: int, past: list[Any], seq_len: int, rope_delta: int,
                max_new_tokens: int, on_token: TokenCallback | None, cancel: threading.Event | None) -> None:
        """The greedy loop after a prompt of `seq_len` tokens whose prefill chose `first_id` and left
        `past`; fills `result`'s tokens, text, decode_ms and cancelled."""
        t0 = time.perf_counter()

        def step(last_id: int, n: int) -> int:
            nonlocal past
            logits, past = self.decode_step(last_id, seq_len + n - 1 + rope_delta, past)
            return int(np.argmax(logits))

        tokens, result.cancelled = greedy_tokens(first_id, step, self.stop_token_ids, max_new_tokens,
                                                 self.prompts.stream_text, on_token, cancel)
        result.decode_ms = _ms(t0)
        result.token_ids = tokens
        result.text = self.prompts.decode(tokens).strip()

    def answer_many(self, image: np.ndarray, questions: list[str], max_new_tokens: list[int] | int = 32,
                    cancels: list[threading.Event | None] | None = None) -> list[AnswerResult]:
        """Greedy answers to several questions about one image, sharing what they have in common
        (as `TorchEngine.answer_many`; the worker groups a camera's waiting questions into one call).

        The frame is resized and encoded once, the prompt's common prefix (the turn's opening, the
        image tokens, whatever the questions share after them) is prefilled once, and each question
        prefills only its own tokens after that cache, which stays inside ONNX Runtime and is only
        read, never copied. Answers are the ones `answer` gives (tested token for token). The first
        result carries the shared preprocessing, vision and prefix times.
        """
        t_start = time.perf_counter()
        if self._closed:
            raise EngineError("engine is closed")
        if not questions:
            return []
        limits, cancels = per_question(len(questions), max_new_tokens, cancels, "answer_many")
        if any(n < 1 for n in limits):
            raise EngineError(f"max_new_tokens must be >= 1, got {limits}")
        if len(questions) == 1:
            return [self.answer(image, questions[0], limits[0], cancel=cancels[0])]
        pixel_values, grid, ids = self._frame_prompts(image, questions)
        prefix = image_prefix_length(ids, self.image_token_id)
        results = [AnswerResult(text="") for _ in questions]
        try:
            t0 = time.perf_counter()
            image_embeds, deepstack = self.run_vision(pixel_values, grid)
            results[0].vision_ms = _ms(t0)
            t0 = time.perf_counter()
            head = ids[0][:prefix]  # every image token is in it (checked above): a prompt of its own
            _, shared, _ = self.prefill(head, self.embed(head, image_embeds), grid, deepstack)
            positions = [rope_index(x, self.image_token_id, grid, self.vision_spec.merge_size) for x in ids]
            results[0].prefill_ms = _ms(t0)
            for i, (question_ids, (position_ids, rope_delta)) in enumerate(zip(ids, positions, strict=True)):
                result = results[i]
                if cancels[i] is not None and cancels[i].is_set():
                    result.cancelled = True
                    continue
                t0 = time.perf_counter()
                outputs = self._extend(self.embed(question_ids[prefix:]), position_ids[:, prefix:], shared)
                first_id = int(np.argmax(outputs[0].numpy()[0]))
                result.prefill_ms += _ms(t0)
                self._decode(result, first_id, outputs, len(question_ids), rope_delta, limits[i], None, cancels[i])
        except EngineError:
            raise
        except Exception as exc:  # an onnxruntime failure mid-request must not look like a crash of the caller
            raise EngineError(f"onnxruntime failed: {type(exc).__name__}: {exc}") from exc
        split_shared_time(results, _ms(t_start))
        return results

    def warmup(self, width: int = 112, height: int = 112, max_new_tokens: int = 2) -> AnswerResult:
        """One throw-away answer so the first real request does not pay session warm-up."""
        return self.answer(np.full((height, width, 3), 128, dtype=np.uint8), "What is in the image?",
                           max_new_tokens=max_new_tokens)

    def close(self) -> None:
        """Drop the sessions; `answer` raises EngineError afterwards."""
        self._closed = True
        self._vision = None  # type: ignore[assignment]
        self._decoder = None  # type: ignore[assignment]
        self.embed_tokens = None  # type: ignore[assignment]


@dataclass(frozen=True)
class _RawBinding:
    binding_type: Any  # onnxruntime's pybind SessionIOBinding
    cpu: Any  # its pybind OrtDevice for CPU memory


def _raw_binding_api(session: Any) -> _RawBinding | None:
    """onnxruntime's pybind IO binding under the documented `InferenceSession.io_binding()`
    wrapper, or None where this onnxruntime does not have the expected objects.

    Why go one layer down: a nano decode step runs its graph in ~118 us, and the wrapper's
    per-call bookkeeping (an OrtDevice built for every bound output, a Python OrtValue wrapped
    around every result, a session check per bound value) added ~26 us to each step (measured
    with onnxruntime 1.32 on one thread: 156 -> 130 us per step). The calls and their order are
    the wrapper's own; `test_the_raw_binding_gives_the_documented_binding_s_tokens` holds the
    two paths to the same tokens, and the engine falls back to the wrapper when this returns None.
    """
    try:
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state as pybind

        binding_type = pybind.SessionIOBinding
        cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        session._sess.run_with_iobinding  # noqa: B018  (present, or AttributeError)
    except Exception:  # noqa: BLE001 - any surprise in another onnxruntime's internals: use the wrapper
        return None
    return _RawBinding(binding_type, cpu)


def _image_config_with_limits(cfg: ImageConfig, image: dict[str, Any]) -> ImageConfig:
    """The processor's settings narrowed to what the export was built for (bounded or fixed size)."""
    from dataclasses import replace

    fixed = image.get("fixed_size")
    return replace(
        cfg,
        min_pixels=int(image.get("min_pixels", cfg.min_pixels)),
        max_pixels=int(image.get("max_pixels", cfg.max_pixels)),
        fixed_size=(int(fixed[0]), int(fixed[1])) if fixed else None,
    )


# ----------------------------------------------------------------------------- registry hooks
def available(model_path: str | Path, device: str = "cpu") -> bool:
    """Backend registry check: onnxruntime installed and an export next to the model
    (`model_path` itself or `<model_path>/onnx`, see `manifest.find_export_dir`)."""
    import importlib.util


    if importlib.util.find_spec("onnxruntime") is None:
        return False
    if device != "cpu" and not device.startswith("cuda"):
        return False
    return find_export_dir(model_path) is not None


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError(
                f"device {device!r} needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
                f"{', '.join(ort.get_available_providers())}"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ModelLoadError(f"onnxruntime backend: unsupported device {device!r} (cpu, cuda, cuda:N)")


def load(
    model_path: str | Path,
    device: str = "cpu",
    engine_dir: str | Path | None = None,
    num_threads: int | None = None,
    max_question_chars: int | None = None,
    is_placeholder: bool | None = None,
) -> OnnxRuntimeEngine:
    """Backend registry loader: the export in `engine_dir`, or found next to `model_path`."""

    export_dir = find_export_dir(model_path, engine_dir)
    if export_dir is None:
        where = engine_dir if engine_dir is not None else f"{model_path} or {Path(model_path) / 'onnx'}"
        raise ModelLoadError(
            f"no ONNX export found in {where}; create one with `vlsi export --model {model_path} "
            f"--out {Path(model_path) / 'onnx'}`"
        )
    return OnnxRuntimeEngine(
        export_dir,
        num_threads=num_threads,
        providers=_providers(device),
        max_question_chars=max_question_chars or DEFAULT_MAX_QUESTION_CHARS,
        is_placeholder=is_placeholder,
    )
