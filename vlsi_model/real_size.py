"""Random-weight models with real checkpoints' dimensions, built locally (`vlsi bench --dims`).

Why: decode speed and memory on a robot depend on a model's dimensions and its bytes per token,
not on its weights, and the model hub is not reachable from every machine (not from ours). So a
user can measure prefill, decode tokens/s against the memory bandwidth, and peak RSS at Qwen2-VL-2B
or -7B size (or Qwen3-VL-2B / 4B) before downloading anything. The dimensions are the config.json
numbers in `vlsi_model.export.memory`, whose parameter arithmetic is tested against models built
from them on the meta device. The tokenizer is the shipped student's (only its special-token ids
matter), with the vocabulary padded to the real size. Answers from random weights mean nothing.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.export import memory

# CLI name -> (real name, config.json numbers; None: the test-size tiny model)
DIMS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "tiny": ("tiny_qwen2_vl", None),
    "2b": ("qwen2_vl_2b", memory.QWEN2_VL_2B_CONFIG),
    "7b": ("qwen2_vl_7b", memory.QWEN2_VL_7B_CONFIG),
    "qwen3-2b": ("qwen3_vl_2b", memory.QWEN3_VL_2B_CONFIG),
    "qwen3-4b": ("qwen3_vl_4b", memory.QWEN3_VL_4B_CONFIG),
}
CACHE_ENV = "VLSI_REAL_SIZE_CACHE"
MAX_PIXELS = 448 * 448  # the Jetson memory tables' image size
FP32_BYTES = 4


def resolve(name: str) -> str:
    """The CLI name of `name` ("2b", "qwen2_vl_2b" and "Qwen2-VL-2B"-like spellings alike), or ValueError."""
    key = name.strip().lower()
    for cli_name, (real, _) in DIMS.items():
        if key in (cli_name, real, real.replace("_", "-")):
            return cli_name
    raise ValueError(f"unknown model size {name!r}; choose from {', '.join(DIMS)}")


def real_size_config(name: str, tokenizer: Any) -> Any:
    """The transformers config of `name` with `tokenizer`'s special-token ids."""
    from vlsi_model.models import tiny_qwen2vl_config, tiny_qwen3vl_config

    cfg = DIMS[resolve(name)][1]
    if cfg is None:
        return tiny_qwen2vl_config(tokenizer=tokenizer)
    if cfg["model_type"] == "qwen2_vl":
        v = cfg["vision_config"]
        return tiny_qwen2vl_config(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
            intermediate_size=cfg["intermediate_size"], vision_depth=v["depth"], vision_embed_dim=v["embed_dim"],
            vision_heads=v["num_heads"], tie_word_embeddings=cfg["tie_word_embeddings"],
            max_position_embeddings=32768, tokenizer=tokenizer)
    t, v = cfg["text_config"], cfg["vision_config"]
    return tiny_qwen3vl_config(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
        intermediate_size=t["intermediate_size"], vision_depth=v["depth"], vision_hidden_size=v["hidden_size"],
        vision_intermediate_size=v["intermediate_size"], vision_heads=v["num_heads"],
        deepstack_visual_indexes=tuple(v["deepstack_visual_indexes"]),
        num_position_embeddings=v["num_position_embeddings"], tie_word_embeddings=True, tokenizer=tokenizer)


def fp32_bytes(name: str) -> int:
    """Bytes of `name`'s weights in fp32 (what building and loading it here costs in RAM); a head
    tied to the embeddings is one tensor, counted once."""
    cfg = DIMS[resolve(name)][1]
    if cfg is None:
        return 0
    dims = memory.ModelDims.from_config(cfg)
    counts = memory.param_counts(dims)
    if dims.tied_embeddings:
        counts.pop("lm_head")
    return FP32_BYTES * sum(counts.values())


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def checkpoint_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per weight of a checkpoint as torch serves it (its config's `dtype` / `torch_dtype`;
    fp32 when unsaid)."""
    text = config.get("text_config") or {}
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return _DTYPE_BYTES.get(str(dtype).replace("torch.", ""), FP32_BYTES)


def check_fits(name: str, available_bytes: int | None = None) -> None:
    """ValueError naming the sizes when `name`'s fp32 weights (+25% for the process) exceed the
    available memory: a 7B model (33 GB in fp32) on a 16 GB machine fails here, not in the OOM killer."""
    need = int(fp32_bytes(name) * 1.25)
    if available_bytes is None:
        available_bytes = available_memory()
    if need > available_bytes:
        raise ValueError(f"a random-weight {DIMS[resolve(name)][0]} needs ~{need / memory.GB:.1f} GB of RAM in fp32; "
                         f"{available_bytes / memory.GB:.1f} GB are available here")


CGROUP_DIR = Path("/sys/fs/cgroup")  # cgroup v2: memory.max / memory.current of this container


def available_memory() -> int:
    """Bytes a new process can use: Linux's MemAvailable (free + reclaimable page cache), else free
    pages; and no more than this cgroup's limit minus its use (a container sees the host's
    MemAvailable, while its own memory.max is what the OOM killer enforces)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = (CGROUP_DIR / "memory.max").read_text().strip()
        used = int((CGROUP_DIR / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return available
    return available if limit == "max" else max(0, min(available, int(limit) - used))


def ids_tokenizer() -> Any:
    """The shipped model's tokenizer (a Qwen2-VL-style one): the special-token ids every real-size
    config takes. The tokenizer alone: the model's weights are not needed for ids."""
    from vlsi_model.checkpoint import load_tokenizer
    from vlsi_model.defaults import default_model_path

    return load_tokenizer(default_model_path())


def build_real_size_model(name: str, max_pixels: int = MAX_PIXELS, seed: int = 0) -> tuple[Any, Any, Any]:
    """(model in eval mode, fp32; tokenizer; image processor bounded to `max_pixels`) for `name`."""
    from vlsi_model.models import build_model, make_image_processor

    tokenizer = ids_tokenizer()
    config = real_size_config(name, tokenizer)
    model = build_model(config, seed=seed).eval()
    factor = 32 if config.model_type == "qwen3_vl" else 28
    processor = make_image_processor(min_pixels=(2 * factor) ** 2, max_pixels=max_pixels,
                                     model_type=config.model_type)
    return model, tokenizer, processor


def config_fingerprint(name: str) -> str:
    """sha256 of the transformers config `name` builds (the cache key: a cached model built from
    other dimensions, or by an older version of this table, is rebuilt rather than measured)."""
    import hashlib
    import json

    config = real_size_config(name, ids_tokenizer()).to_dict()
    config.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def cache_root() -> Path:
    """Where built models are kept: $VLSI_REAL_SIZE_CACHE, else ~/.cache/vlsi_ros/real_size."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlsi_ros" / "real_size")


def real_size_model_dir(name: str, root: str | Path | None = None, progress: Any = None) -> Path:
    """A model directory of `name` (built and saved once, then reused): what `vlsi bench` loads.

    Saved beside its destination and renamed into place, so a directory that exists is complete.
    The 2B model takes ~9 GB of disk and RAM in fp32 and a minute or two to build."""
    from vlsi_model.manifest import read_metadata_json
    from vlsi_model.models import save_model_dir

    name = resolve(name)
    real = DIMS[name][0]
    dest = Path(root) if root is not None else cache_root()
    dest = dest / real
    fingerprint = config_fingerprint(name)
    meta = read_metadata_json(dest)
    if (dest / "config.json").is_file() and meta.get("real_size") == real and meta.get("config_sha256") == fingerprint:
        return dest
    if (dest / "config.json").is_file():
        say_stale = progress or (lambda msg: None)
        say_stale(f"{dest} was built from other dimensions (or before they were recorded): rebuilding it")
    check_fits(name)
    say = progress or (lambda msg: None)
    say(f"building a random-weight {real} in {dest} (once; reused by later runs)")
    t0 = time.perf_counter()
    model, tokenizer, processor = build_real_size_model(name)
    save_model_dir(model, tokenizer, processor, dest, overwrite=True,  # written aside, renamed into place
                   metadata={"placeholder": False, "real_size": real, "random_weights": True,
                             "config_sha256": fingerprint,
                             "note": "random weights at real dimensions: for speed and memory only"})
    del model
    say(f"built {real} in {time.perf_counter() - t0:.0f} s")
    return dest


def decode_weight_bytes(config: dict[str, Any], dtype_bytes: int = FP32_BYTES) -> int:
    """Weight bytes one decode step reads: every decoder layer, the final norm and the LM head
    (the embedding table is read one row per token). The KV cache comes on top, growing with the
    context; at the bench's few hundred tokens it is under 1% of a 2B model's weights."""
    counts = memory.param_counts(memory.ModelDims.from_config(config))
    return (counts["decoder_layers"] + counts["lm_head"]) * dtype_bytes


def measure_read_bandwidth(threads: int | None = None, megabytes: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of `repeats` passes summing a `megabytes` float32 array
    split over `threads` threads (numpy releases the GIL in reductions), i.e. what a decode step that
    streams its weights once could read at best on this machine."""
    threads = max(1, threads or os.cpu_count() or 1)
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, chunks))  # warm: pages touched, threads started
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9
