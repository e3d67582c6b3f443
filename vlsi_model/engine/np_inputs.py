"""Model inputs for the exported graphs, in numpy only (no torch): what the ONNX Runtime and
TensorRT backends feed to the vision, prefill and decode graphs.

Why a second implementation of preprocessing: `vlsi_model.prompting` and transformers'
`Qwen2VLImageProcessorPil` both import torch, and the point of the exported backends is a
runtime without PyTorch (a Jetson image with TensorRT only, a small robot process, a
benchmark whose peak memory must not include the torch model). Each function here mirrors
one piece of the PyTorch path and is tested to produce *identical* values:

- `preprocess_image`  = Qwen2VLImageProcessorPil (PIL bicubic resize, rescale, normalise,
  patchify), bit for bit;
- `PromptBuilder`     = prompting.build_inputs' token layout (chat template, sanitised
  question, one `<|image_pad|>` per merged image token);
- `rope_index`        = get_rope_index for one image (3-D M-RoPE positions + rope_delta);
- `mrope_cos_sin`     = the text rotary embedding (Qwen2VLRotaryEmbedding) from positions;
  with `interleaved`, Qwen3-VL's (Qwen3VLTextRotaryEmbedding: axes interleaved per band);
- `vision_aux_inputs` = get_vision_position_ids / cu_seqlens / get_vision_window_index and
  the vision rotary embedding: the index math `graphs.VisionGraph` takes as inputs; for
  Qwen3-VL also `position_grid_taps` (get_vision_interpolation_indices_and_weights, bilinear
  with aligned corners: its learned position grid resampled to the image).

The request checks (`validate_image`, `validate_question`) are not re-implemented: they
live in the torch-free `vlsi_model.engine.validation`, shared with `prompting`, and are
re-exported here.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.engine.base import EngineError, ModelLoadError

# The request checks are the torch path's own functions (prompting re-exports the same ones),
# imported here so the backends that import them from this module keep working.
from vlsi_model.engine.validation import MAX_ASPECT_RATIO, MAX_IMAGE_SIDE, validate_image, validate_question

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_SIDE",
    "ImageConfig",
    "PromptBuilder",
    "VisionSpec",
    "causal_bias",
    "deepstack_at_tokens",
    "frame_prompts",
    "mrope_cos_sin",
    "position_grid_taps",
    "preprocess_image",
    "rope_index",
    "smart_resize",
    "validate_image",
    "validate_question",
    "vision_aux_inputs",
    "vision_cos_sin",
    "vision_position_ids",
    "window_index",
]

IMAGE_TOKEN = "<|image_pad|>"
END_OF_TURN_TOKEN = "<|im_end|>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- image
@dataclass(frozen=True)
class ImageConfig:
    """The image processor settings that decide pixel values (preprocessor_config.json)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    # (height, width) every image is resized to, ignoring its aspect ratio: an export with a
    # static vision graph (`vlsi export --image-size`). None: Qwen2-VL's smart_resize.
    fixed_size: tuple[int, int] | None = None

    @classmethod
    def from_json(cls, path: str | Path) -> ImageConfig:
        """Read a Hugging Face preprocessor_config.json (Qwen2-VL image processor)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read the image processor config ({exc})") from exc
        size = data.get("size") or {}
        kw: dict[str, Any] = {
            "min_pixels": int(data.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            "max_pixels": int(data.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
        }
        for key in ("patch_size", "merge_size", "temporal_patch_size", "resample"):
            if key in data:
                kw[key] = int(data[key])
        for key in ("rescale_factor",):
            if key in data:
                kw[key] = float(data[key])
        for key in ("image_mean", "image_std"):
            if key in data:
                kw[key] = tuple(float(v) for v in data[key])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if key in data:
                kw[key] = bool(data[key])
        return cls(**kw)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count within bounds, aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise EngineError(f"image aspect ratio {width}x{height} is too extreme (at most {MAX_ASPECT_RATIO}:1)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: np.ndarray, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(pixel_values float32 [patches, C*T*P*P], grid (t, h, w)) for one validated H x W x 3 uint8 image.

    Exactly Qwen2VLImageProcessorPil: PIL resize of the uint8 image, float64 rescale cast to
    float32, float32 normalisation, then the (gh, gw, mh, mw, C, T, ph, pw) patch layout.
    """
    from PIL import Image

    h, w = image.shape[:2]
    if cfg.fixed_size is not None:
        rh, rw = cfg.fixed_size
        image = np.array(Image.fromarray(image).resize((rw, rh), resample=cfg.resample))
    elif cfg.do_resize:
        factor = cfg.patch_size * cfg.merge_size
        rh, rw = smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)
        image = np.array(Image.fromarray(image).resize((rw, rh), resample=cfg.resample))
    x = image.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else image
    x = np.asarray(x, dtype=np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)
        std = np.array(cfg.image_std, dtype=np.float32)
        x = (x - mean) / std
    x = np.ascontiguousarray(x.transpose(2, 0, 1))  # C, H, W
    c, rh, rw = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // p, rw // p
    if gh % m or gw % m:
        raise EngineError(f"resized image {rw}x{rh} is not a multiple of {p * m} pixels")
    patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def frame_prompts(image: np.ndarray, questions: list[str], cfg: ImageConfig, merge_size: int,
                  prompts: PromptBuilder, max_question_chars: int) -> tuple[np.ndarray, tuple[int, int, int],
                                                                            list[np.ndarray]]:
    """(pixel_values, grid, prompt ids per question) for questions about one frame: the image and
    every question checked first (EngineError before any work), the frame preprocessed once. What
    the exported backends (ONNX Runtime, TensorRT) run before their graphs."""
    image = validate_image(image)
    texts = [validate_question(q, max_question_chars) for q in questions]
    pixel_values, grid = preprocess_image(image, cfg)
    n_img = grid[0] * grid[1] * grid[2] // merge_size**2
    return pixel_values, grid, [prompts.prompt_ids(q, n_img) for q in texts]


# ----------------------------------------------------------------------------- prompt
class PromptBuilder:
    """Token ids of a user turn with one image and a question, as `prompting.build_inputs` builds them.

    Uses the model directory's fast tokenizer through transformers' tokenizers backend
    (which does not import torch) and its chat template.
    """

    # Prompts kept (question, image tokens) -> ids: a robot's standing questions and alerts are the
    # same strings on every frame, and the chat template + tokenizer cost ~0.1-0.3 ms a prompt.
    CACHED_PROMPTS = 256

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._prompts: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelLoadError(f"tokenizer has no {IMAGE_TOKEN} token; it is not a Qwen2-VL tokenizer")
        self.image_token_id = int(tid)

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptBuilder:
        """Load tokenizer.json / tokenizer_config.json (+ chat template) from `path`, offline."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path}: missing tokenizer.json")
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # tokenizers raises many types for a broken file
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
        if not tok.chat_template and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str) and template:
                tok.chat_template = template
        if not tok.chat_template:
            from vlsi_model.tokenizer import QWEN2VL_CHAT_TEMPLATE

            tok.chat_template = QWEN2VL_CHAT_TEMPLATE
        return cls(tok)

    def prompt_ids(self, question: str, num_image_tokens: int) -> np.ndarray:
        """int64 [L] ids (read-only) ending with the generation prompt; `question` must be validated
        already. The most recent CACHED_PROMPTS prompts are kept."""
        key = (question, num_image_tokens)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self._build_prompt_ids(question, num_image_tokens)
            ids.flags.writeable = False
            self._prompts[key] = ids
            if len(self._prompts) > self.CACHED_PROMPTS:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return ids

    def _build_prompt_ids(self, question: str, num_image_tokens: int) -> np.ndarray:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        ids = list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, sanitize_control_tokens=True, return_dict=False
            )
        )
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != 1:
            raise EngineError(
                f"the tokenizer's chat template produced {len(positions)} {IMAGE_TOKEN} tokens for one image, "
                "expected exactly 1"
            )
        p = positions[0]
        out = ids[:p] + [self.image_token_id] * num_image_tokens + ids[p + 1 :]
        return np.asarray(out, dtype=np.int64)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def stream_text(self, token_ids: list[int]) -> str:
        """Text of the tokens so far for streaming, without a trailing half-decoded UTF-8
        character (byte-level BPE emits multi-byte characters over several tokens)."""
        return self.decode(token_ids).rstrip("\ufffd").strip()


# ----------------------------------------------------------------------------- text rotary
def rope_index(input_ids: np.ndarray, image_token_id: int, grid_thw: tuple[int, int, int],
               merge_size: int) -> tuple[np.ndarray, int]:
    """(position_ids int64 [3, L], rope_delta) for a sequence with one image, as get_rope_index.

    Text tokens count up on all three axes; the image's merged tokens get (t, row, column)
    offsets from the position where the image starts; text after the image continues from
    start + max(rows, columns). rope_delta = max position + 1 - L shifts every decode step.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_img = ids == image_token_id
    t, h, w = grid_thw
    gt, gh, gw = t, h // merge_size, w // merge_size
    chunks: list[np.ndarray] = []
    pos = 0
    i = 0
    n = len(ids)
    while i < n:
        j = i
        while j < n and is_img[j] == is_img[i]:
            j += 1
        if not is_img[i]:
            chunks.append(np.broadcast_to(np.arange(pos, pos + (j - i), dtype=np.int64), (3, j - i)))
            pos += j - i
        else:
            if j - i != gt * gh * gw:
                raise EngineError(f"{j - i} image tokens but the image grid has {gt * gh * gw}")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + pos)
            pos += max(gh, gw)
        i = j
    positions = np.concatenate(chunks, axis=1)
    return positions, int(positions.max()) + 1 - n


def mrope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray, mrope_section: list[int],
                  dtype: np.dtype = np.float32, interleaved: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE (cos, sin) [1, S, head_dim] for position_ids [3, S], as Qwen2VLRotaryEmbedding.

    Each frequency band takes its angle from one axis (t, h, w in turn per `mrope_section`),
    and the half-width table is repeated to the full head dim (rotate_half layout).
    `interleaved` (Qwen3-VL): frequency j takes h when j % 3 == 1 and j < 3 * section[1], w
    when j % 3 == 2 and j < 3 * section[2], t otherwise.
    """
    freqs = position_ids.astype(np.float32)[..., None] * inv_freq.astype(np.float32)  # [3, S, hd/2]
    if interleaved:
        f = freqs[0].copy()
        for axis in (1, 2):
            f[..., axis:mrope_section[axis] * 3:3] = freqs[axis, ..., axis:mrope_section[axis] * 3:3]
    else:
        bounds = np.cumsum([0, *mrope_section])
        f = np.concatenate([freqs[k % 3, :, bounds[k]:bounds[k + 1]] for k in range(len(mrope_section))], axis=-1)
    f = np.concatenate([f, f], axis=-1)[None]
    return np.cos(f).astype(dtype), np.sin(f).astype(dtype)


# ----------------------------------------------------------------------------- vision index math
def vision_position_ids(grid_thw: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, column) of every patch [N, 2], in the processor's merge-block-major patch order."""
    t, h, w = grid_thw
    hp, wp = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    hp = hp.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wp = wp.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hp, wp], axis=-1), (t, 1)).astype(np.int64)


def vision_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vision rotary (cos, sin) float32 [N, head_dim] from (row, column) positions [N, 2]."""
    freqs = position_ids.astype(np.float32)[..., None] * inv_freq.astype(np.float32)  # [N, 2, d/4]
    f = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    f = np.concatenate([f, f], axis=-1)
    return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)


def window_index(grid_thw: tuple[int, int, int], merge_size: int, window_size: int,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL: (merged-token permutation into window order [M], window id per patch in that order [N]).

    Same windows as get_vision_window_index; the window ids replace cu_window_seqlens (the
    graph masks attention between different ids).
    """
    t, h, w = grid_thw
    lh, lw = h // merge_size, w // merge_size
    vw = window_size // merge_size // patch_size
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = vw - lh % vw, vw - lw % vw
    nh, nw = (lh + pad_h) // vw, (lw + pad_w) // vw
    padded = np.full((t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
    padded[:, :lh, :lw] = index
    padded = padded.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vw * vw)
    counts = (padded != -100).sum(axis=-1).reshape(-1)
    flat = padded.reshape(-1)
    order = flat[flat != -100]
    unit = merge_size**2
    window_ids = np.repeat(np.arange(len(counts)), counts * unit)
    return order.astype(np.int64), window_ids.astype(np.int64)


def position_grid_taps(grid_thw: tuple[int, int, int], merge_size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL: (indices int32 [N, 4], weights float32 [N, 4]) that resample its learned
    `side` x `side` position grid to the image's patch grid, bilinear with aligned corners, in
    the processor's patch order: as get_vision_interpolation_indices_and_weights, float32
    arithmetic in the same order so the weights are the same floats."""
    t, h, w = grid_thw
    pos = vision_position_ids((1, h, w), merge_size)

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
        return taps, weights.astype(np.float32)

    h_taps, h_weights = axis(pos[:, 0], h)
    w_taps, w_weights = axis(pos[:, 1], w)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return np.tile(indices, (t, 1)).astype(np.int32), np.tile(weights, (t, 1)).astype(np.float32)


@dataclass(frozen=True)
class VisionSpec:
    """What the runtime needs to know about the exported vision graph (from export_manifest.json)."""

    model_type: str
    merge_size: int
    patch_size: int
    window_size: int = 0
    position_grid: int = 0  # Qwen3-VL: side of the learned position grid (0: none)


def vision_aux_inputs(grid_thw: tuple[int, int, int], spec: VisionSpec, inv_freq: np.ndarray) -> dict[str, np.ndarray]:
    """The vision graph's inputs besides pixel_values (see graphs.VisionGraph)."""
    pos = vision_position_ids(grid_thw, spec.merge_size)
    cos, sin = vision_cos_sin(pos, inv_freq)
    n = pos.shape[0]
    out = {
        "rotary_cos": cos,
        "rotary_sin": sin,
        # one image per request; a frame of t > 1 (video) attends within itself, as cu_seqlens says
        "full_segments": np.repeat(np.arange(grid_thw[0], dtype=np.int32), n // grid_thw[0]),
    }
    if spec.model_type == "qwen2_5_vl":
        order, window_ids = window_index(grid_thw, spec.merge_size, spec.window_size, spec.patch_size)
        out["window_segments"] = window_ids.astype(np.int32)
        out["window_index"] = order.astype(np.int32)
        out["reverse_index"] = np.argsort(order, kind="stable").astype(np.int32)
    if spec.model_type == "qwen3_vl":
        out["pos_indices"], out["pos_weights"] = position_grid_taps(grid_thw, spec.merge_size, spec.position_grid)
    return out


def causal_bias(seq_len: int, past_len: int, dtype: np.dtype, masked: float) -> np.ndarray:
    """Additive attention bias [1, 1, S, P+S]: query i (absolute P+i) sees keys 0..P+i."""
    total = past_len + seq_len
    q = np.arange(seq_len)[:, None] + past_len
    k = np.arange(total)[None, :]
    bias = np.where(k <= q, 0.0, masked).astype(dtype)
    return bias[None, None]


def deepstack_at_tokens(input_ids: np.ndarray, image_token_id: int, deepstack: np.ndarray | None, layers: int,
                        dtype: np.dtype) -> np.ndarray:
    """Qwen3-VL: the decoder's deepstack_embeds [K, 1, L, hidden]: the vision graph's DeepStack
    features [K, image tokens, hidden] at the image tokens' positions, zeros elsewhere (what
    Hugging Face's text model adds in place at `visual_pos_masks`)."""
    mask = np.asarray(input_ids).reshape(-1) == image_token_id
    if deepstack is None or deepstack.ndim != 3 or deepstack.shape[:2] != (layers, int(mask.sum())):
        got = None if deepstack is None else deepstack.shape
        raise EngineError(f"the decoder needs DeepStack features for {layers} layers and {int(mask.sum())} image "
                          f"tokens, got {got}")
    out = np.zeros((layers, 1, mask.size, deepstack.shape[2]), dtype=dtype)
    out[:, 0, mask] = deepstack.astype(dtype)
    return out
