"""Precomputed teacher distributions (top-k + tail), so the teacher need not run during interaction.

The teacher is frozen in the interaction step, so its verbalized distributions for a
training sample never change. Computing them once and storing them lets the student
train without the teacher on the same GPU (a 72B teacher needs several). A full
distribution per token per target would be V floats (~600 kB for Qwen's vocabulary); the
cache keeps the top-k log-probabilities and their token ids, plus the log of the
remaining ("tail") probability mass.

Approximation ("one tail bucket"): with the teacher's top-k token set K and tail mass
q_tail = 1 - sum_{v in K} q(v), the student's distribution p is coarsened the same way
(p(v) for v in K, p_tail = 1 - sum_{v in K} p(v), computed exactly as a logsumexp of the
student's log-probs outside K), and the divergence is taken between the two (k + 1)-bucket
distributions:
  forward KL  ~ sum_{v in K} q(v) log(q(v)/p(v)) + q_tail log(q_tail / p_tail)
  reverse KL  ~ sum_{v in K} p(v) log(p(v)/q(v)) + p_tail log(p_tail / q_tail)
  symmetric   ~ the mean of the two
  CE          = -log p(argmax q)  (exact: the argmax is the top-1 entry)
By the data-processing (log-sum) inequality the bucketed KLs are lower bounds of the true
KLs, tight when the teacher's tail mass is small or the student's tail is proportional to
the teacher's. Their gradient matches p to q on K and the student's tail *mass* to the
teacher's, leaving the shape of the student's tail free (standard top-k distillation).
L2 is the exception to the single bucket: (p_tail - q_tail)^2 would square a sum of
differences and overstate the error many times over, so the teacher's tail mass is spread
evenly over the V - k tail tokens instead (the least-informed guess) and the sum is exact
for that guess: L2 ~ sum_{v in K} (p(v) - q(v))^2 + sum_{v not in K} (p(v) - q_tail/(V-k))^2.
With k = V (the whole shared vocabulary) the tail is empty and every op is exact
(`compare_cached_to_online` reports the gap per k).

On disk (`out_dir/`): `index.json` (format, k, vocab size, temperature, teacher target
layers, per-sample shard/offset/length/fingerprint) and `shard-00000.safetensors`, ... with
tensors `<target>.logp` [n, k] (float32 by default), `<target>.idx` [n, k] int32 and
`<target>.tail` [n] float32, where `<target>` is `L<layer>` or `final`, and n runs over
the response positions of the shard's samples, concatenated. Sample ids are dataset
indices unless given; the fingerprint (sha1 of a sample's unpadded input ids and response
mask) catches a cache used with data it was not built from. The cache is built over the
vocabulary prefix shared with the student (`vocab_size`), so it is tied to that student
vocabulary size (see `CachedTeacherTarget.chunk`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from vlsi_model.distill.adapters import BackboneAdapter, get_adapter
from vlsi_model.distill.losses import (
    DEFAULT_CHUNK_TOKENS,
    DenseTeacher,
    LossConfig,
    divergence_matrix,
    gather_positions,
    head_vocab_size,
    response_positions,
)
from vlsi_model.distill.verbalizer import VerbalizedHead, Verbalizers

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
FINAL = "final"
SAMPLE_INDEX_KEY = "sample_index"
_NEG_INF = float("-inf")


def target_key(layer: int | str) -> str:
    return FINAL if layer == FINAL else f"L{int(layer)}"


# ---------------------------------------------------------------------------------------------
# Encoding and the bucketed divergence
# ---------------------------------------------------------------------------------------------


def encode_topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([c, k] top-k log-probs sorted descending, [c, k] their ids, [c] log tail mass) of [c, V] log-probs.

    The tail is computed as a logsumexp of the entries outside the top k (exact, no
    1 - sum cancellation); it is -inf when k >= V.
    """
    k = min(int(k), int(logp.shape[-1]))
    top, idx = torch.topk(logp, k, dim=-1, sorted=True)
    if k == logp.shape[-1]:
        tail = torch.full(logp.shape[:-1], _NEG_INF, dtype=logp.dtype, device=logp.device)
    else:
        tail = torch.logsumexp(logp.scatter(-1, idx, _NEG_INF), dim=-1)
    return top, idx, tail


def _kl_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise exp(a) * (a - b) with 0 where exp(a) == 0 (0 log 0 = 0)."""
    return torch.where(a == _NEG_INF, torch.zeros_like(a), a.exp() * (a - b))


def bucket_divergence(
    student_logp: torch.Tensor,
    topk_logp: torch.Tensor,
    topk_idx: torch.Tensor,
    tail_logmass: torch.Tensor,
    op: str,
    direction: str = "forward",
) -> torch.Tensor:
    """[c] per-token divergence of the student's [c, V] log-probs to a cached top-k + tail (module docstring)."""
    idx = topk_idx.long()
    if op == "ce":
        return -student_logp.gather(-1, idx[:, :1]).squeeze(-1)
    s_top = student_logp.gather(-1, idx)
    if idx.shape[-1] == student_logp.shape[-1]:
        s_tail = torch.full_like(tail_logmass, _NEG_INF)
    else:
        s_tail = torch.logsumexp(student_logp.scatter(-1, idx, _NEG_INF), dim=-1)
    if op == "l2":
        top = (s_top.exp() - topk_logp.to(s_top.dtype).exp()).pow(2).sum(-1)
        n_tail = student_logp.shape[-1] - idx.shape[-1]
        if n_tail == 0:
            return top
        p = student_logp.exp()
        p_sq_tail = p.pow(2).sum(-1) - s_top.exp().pow(2).sum(-1)  # sum over the tail of p(v)^2
        q_each = tail_logmass.to(p.dtype).exp() / n_tail
        # sum_{tail} (p - q_each)^2 = sum p^2 - 2 q_each p_tail + n_tail q_each^2
        return top + p_sq_tail - 2 * q_each * s_tail.exp() + n_tail * q_each.pow(2)
    s = torch.cat([s_top, s_tail[:, None]], dim=-1)
    t = torch.cat([topk_logp.to(s.dtype), tail_logmass.to(s.dtype)[:, None]], dim=-1)
    if op != "kld":
        raise ValueError(f"unknown op {op!r}")
    if direction == "forward":
        return _kl_terms(t, s).sum(-1)
    if direction == "reverse":
        return _kl_terms(s, t).sum(-1)
    if direction == "symmetric":
        return 0.5 * (_kl_terms(t, s).sum(-1) + _kl_terms(s, t).sum(-1))
    raise ValueError(f"unknown direction {direction!r}")


@dataclass
class CachedChunk:
    topk_logp: torch.Tensor
    topk_idx: torch.Tensor
    tail_logmass: torch.Tensor

    def divergence(self, student_logp: torch.Tensor, op: str, direction: str) -> torch.Tensor:
        device = student_logp.device
        return bucket_divergence(
            student_logp, self.topk_logp.to(device), self.topk_idx.to(device), self.tail_logmass.to(device),
            op, direction,
        )


@dataclass
class CachedTeacherTarget:
    """A `losses.TeacherTarget` backed by cached top-k log-probs [N, k], ids [N, k] and tails [N]."""

    topk_logp: torch.Tensor
    topk_idx: torch.Tensor
    tail_logmass: torch.Tensor
    cache_vocab_size: int
    temperature: float

    @property
    def vocab_size(self) -> int:
        return self.cache_vocab_size

    @property
    def num_tokens(self) -> int:
        return int(self.topk_logp.shape[0])

    def chunk(self, start: int, end: int, vocab: int, temperature: float) -> CachedChunk:
        if vocab != self.cache_vocab_size:
            raise ValueError(
                f"the teacher cache covers a {self.cache_vocab_size}-token vocabulary but the student's is {vocab}; "
                "rebuild the cache with vocab_size = min(student, teacher vocabulary size)"
            )
        if abs(temperature - self.temperature) > 1e-9:
            raise ValueError(
                f"the teacher cache was built at temperature {self.temperature}, the loss uses {temperature}"
            )
        return CachedChunk(self.topk_logp[start:end], self.topk_idx[start:end], self.tail_logmass[start:end])


def cached_from_dense(
    teacher: DenseTeacher, k: int, vocab: int | None = None, temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, dtype: torch.dtype = torch.float32,
) -> CachedTeacherTarget:
    """Encode an online teacher target as top-k + tail in memory (what the disk cache stores)."""
    vocab = vocab or teacher.vocab_size
    tops, idxs, tails = [], [], []
    n = teacher.num_tokens
    for start in range(0, max(n, 1), chunk_tokens):
        end = min(n, start + chunk_tokens)
        logp = teacher.chunk(start, end, vocab, temperature).logp
        top, idx, tail = encode_topk(logp, k)
        tops.append(top.to(dtype))
        idxs.append(idx.to(torch.int32))
        tails.append(tail.float())
    return CachedTeacherTarget(torch.cat(tops), torch.cat(idxs), torch.cat(tails), vocab, temperature)


# ---------------------------------------------------------------------------------------------
# Sample ids through a DataLoader
# ---------------------------------------------------------------------------------------------


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so each item also carries its index under `sample_index`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item[SAMPLE_INDEX_KEY] = int(index)
        return item


def indexed_collate(collate_fn: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[Any]], dict[str, Any]]:
    """A collate function that passes `sample_index` through as a [B] LongTensor and collates the rest."""

    def collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [int(item[SAMPLE_INDEX_KEY]) for item in items]
        batch = dict(collate_fn([{k: v for k, v in item.items() if k != SAMPLE_INDEX_KEY} for item in items]))
        batch[SAMPLE_INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch

    return collate


def sample_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> str:
    """sha1 of one row's unpadded input ids and its response mask (see the module docstring)."""
    keep = attention_mask.bool()
    h = hashlib.sha1()
    h.update(input_ids[keep].to(torch.int64).cpu().numpy().tobytes())
    h.update(response_positions(labels[None])[0][keep].cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Building and reading the disk cache
# ---------------------------------------------------------------------------------------------


def teacher_heads(
    teacher: nn.Module, adapter: BackboneAdapter, verbalizers: Verbalizers
) -> dict[int | str, nn.Module]:
    """{layer: VerbalizedHead, "final": lm_head} for a teacher."""
    norm, head = adapter.final_norm(teacher), adapter.lm_head(teacher)
    heads: dict[int | str, nn.Module] = {
        t: VerbalizedHead(verbalizers[t], norm, head) for t in verbalizers.target_layers
    }
    heads[FINAL] = head
    return heads


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    verbalizers: Verbalizers,
    batches: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    k: int,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = 65536,
    dtype: torch.dtype = torch.float32,
    adapter: BackboneAdapter | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Run the frozen teacher over `batches` and write its top-k verbalized distributions to `out_dir`.

    `batches` are collated batches carrying `sample_index` (see `IndexedDataset` /
    `indexed_collate`) and `labels`. `vocab_size` is the vocabulary prefix to cover, normally
    min(student, teacher) vocabulary size (default: the teacher's). `k` larger than the
    vocabulary stores full distributions. A shard is flushed once it holds `shard_tokens`
    response positions. The index is written last (atomically).
    """
    adapter = adapter or get_adapter(teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = teacher_heads(teacher, adapter, verbalizers)
    vocab = min(vocab_size or adapter.vocab_size(teacher), min(head_vocab_size(h) for h in heads.values()))
    k = min(int(k), vocab)
    keys = [target_key(t) for t in heads]
    samples: dict[str, dict[str, Any]] = {}
    buffer: dict[str, list[torch.Tensor]] = {}
    pending: list[tuple[str, int, str]] = []  # (sample id, length, fingerprint) of the open shard
    shard_count = 0
    shard_fill = 0

    def flush() -> None:
        nonlocal shard_count, shard_fill, buffer, pending
        if not pending:
            return
        name = f"shard-{shard_count:05d}.safetensors"
        tensors = {key: torch.cat(parts).contiguous().cpu() for key, parts in buffer.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        offset = 0
        for sid, length, fp in pending:
            samples[sid] = {"shard": name, "offset": offset, "length": length, "fingerprint": fp}
            offset += length
        shard_count += 1
        shard_fill = 0
        buffer, pending = {}, []

    device = next(teacher.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if SAMPLE_INDEX_KEY not in batch or "labels" not in batch:
            raise ValueError(f"batches for the teacher cache need {SAMPLE_INDEX_KEY!r} and 'labels'")
        hs = adapter.forward_with_hidden_states(teacher, batch, verbalizers.target_layers)
        labels = batch["labels"]
        mask = response_positions(labels)
        # The whole batch's response rows at once (in batch order, as `TeacherCache.targets`
        # reads them back): one top-k pass per target instead of one per sample.
        for t, head in heads.items():
            hidden = hs.final if t == FINAL else hs.layers[int(t)]
            enc = cached_from_dense(
                DenseTeacher(gather_positions(hidden, mask), head), k, vocab, temperature, chunk_tokens, dtype
            )
            key = target_key(t)
            buffer.setdefault(f"{key}.logp", []).append(enc.topk_logp)
            buffer.setdefault(f"{key}.idx", []).append(enc.topk_idx)
            buffer.setdefault(f"{key}.tail", []).append(enc.tail_logmass)
        attn = batch.get("attention_mask", torch.ones_like(labels))
        for b in range(labels.shape[0]):
            length = int(mask[b].sum())
            sid = str(int(batch[SAMPLE_INDEX_KEY][b]))
            pending.append((sid, length, sample_fingerprint(batch["input_ids"][b], attn[b], labels[b])))
            shard_fill += length
            if progress is not None:
                progress(1)
        if shard_fill >= shard_tokens:
            flush()
    flush()
    index = {
        "format_version": FORMAT_VERSION,
        "k": k,
        "vocab_size": vocab,
        "temperature": float(temperature),
        "dtype": str(dtype).removeprefix("torch."),
        "targets": [t for t in verbalizers.target_layers],
        "keys": keys,
        "model_type": adapter.model_type,
        "samples": samples,
    }
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX_FILE)
    return out


class TeacherCache:
    """Reads a cache written by `build_teacher_cache`; `targets(batch)` gives a batch's teacher targets."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {INDEX_FILE} (not a teacher cache, or an unfinished one)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: unsupported format_version {self.index.get('format_version')!r}")
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.temperature = float(self.index["temperature"])
        self.target_layers: list[int] = [int(t) for t in self.index["targets"]]
        self.samples: dict[str, dict[str, Any]] = self.index["samples"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard]

    def _rows(self, sid: str, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = self.samples[sid]
        f = self._open(info["shard"])
        lo, hi = int(info["offset"]), int(info["offset"]) + int(info["length"])
        return (
            f.get_slice(f"{key}.logp")[lo:hi],
            f.get_slice(f"{key}.idx")[lo:hi],
            f.get_slice(f"{key}.tail")[lo:hi],
        )

    def targets(
        self, batch: Mapping[str, Any], device: torch.device | str = "cpu"
    ) -> tuple[list[CachedTeacherTarget], CachedTeacherTarget]:
        """(one target per cached teacher layer, the final layer) for a batch with `sample_index`.

        Rows are concatenated in batch order, matching `gather_positions(hidden,
        response_positions(labels))`. Raises ValueError for a sample not in the cache or
        whose tokens changed since the cache was built.
        """
        ids = [str(int(i)) for i in batch[SAMPLE_INDEX_KEY]]
        labels = batch["labels"]
        attn = batch.get("attention_mask", torch.ones_like(labels))
        for b, sid in enumerate(ids):
            if sid not in self.samples:
                raise ValueError(f"sample {sid} is not in the teacher cache {self.path}")
            fp = sample_fingerprint(batch["input_ids"][b], attn[b], labels[b])
            if fp != self.samples[sid]["fingerprint"]:
                raise ValueError(
                    f"sample {sid} differs from the one the teacher cache {self.path} was built from "
                    "(different data, tokenizer or max_length); rebuild the cache"
                )

        def gather(key: str) -> CachedTeacherTarget:
            parts = [self._rows(sid, key) for sid in ids]
            return CachedTeacherTarget(
                torch.cat([p[0] for p in parts]).float().to(device),
                torch.cat([p[1] for p in parts]).long().to(device),
                torch.cat([p[2] for p in parts]).float().to(device),
                self.vocab_size,
                self.temperature,
            )

        return [gather(target_key(t)) for t in self.target_layers], gather(FINAL)


# ---------------------------------------------------------------------------------------------
# How good is the approximation?
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compare_cached_to_online(
    student_hidden: Sequence[torch.Tensor],
    student_heads: Sequence[nn.Module],
    teachers: Sequence[DenseTeacher],
    ks: Sequence[int],
    config: LossConfig | None = None,
) -> dict[int, dict[str, float]]:
    """For each k: the gap between the [S, T] divergence matrices against a top-k cache and online.

    Returns {k: {"max_abs": ..., "mean_abs": ..., "max_rel": ..., "mean_online": ...}}; k larger
    than the vocabulary means the full distribution (gap ~ float rounding).
    """
    config = config or LossConfig()
    vocab = min(min(head_vocab_size(h) for h in student_heads), min(t.vocab_size for t in teachers))
    args = dict(
        op=config.intermediate_op, direction=config.direction, temperature=config.temperature,
        chunk_tokens=config.chunk_tokens,
    )
    online = divergence_matrix(student_hidden, student_heads, teachers, **args)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        cached = [cached_from_dense(t, k, vocab, config.temperature, config.chunk_tokens) for t in teachers]
        approx = divergence_matrix(student_hidden, student_heads, cached, **args)
        gap = (approx - online).abs()
        out[int(k)] = {
            "max_abs": float(gap.max()),
            "mean_abs": float(gap.mean()),
            "max_rel": float((gap / online.abs().clamp_min(1e-12)).max()),
            "mean_online": float(online.mean()),
        }
    return out


def write_teacher_cache(teacher_dir: str | os.PathLike[str], verbalizers_dir: str | os.PathLike[str],
                        labelled: str | os.PathLike[str], cache_dir: str | os.PathLike[str], k: int = 64,
                        batch_size: int = 4, device: str = "cpu", temperature: float = 1.0,
                        vocab_size: int | None = None, max_length: int = 2048) -> Path:
    """The teacher's top-k verbalized distributions over every record of `labelled`, in the
    teacher-cache format `vlsi distill` reads (`teacher_cache.path`, with `labelled` as data.train,
    the same max_length and temperature; `vocab_size`: the vocabulary shared with the student,
    default the teacher's). Sample ids are the dataset's indices, as in the distill pipeline.
    What `vlsi label --cache` runs after labelling, so step 2 never loads the teacher again."""
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.distill.adapters import get_adapter
    from vlsi_model.distill.verbalizer import load_verbalizers
    from vlsi_model.fileio import replace_directory
    from vlsi_model.training.dataset import ConversationDataset, make_collate_fn

    teacher, tokenizer, processor = load_model_dir(teacher_dir, device=device)
    verbs = load_verbalizers(verbalizers_dir, expect_hidden_size=get_adapter(teacher).hidden_size(teacher))
    verbs = verbs.to(next(teacher.parameters()).device)
    dataset = IndexedDataset(ConversationDataset(labelled, tokenizer, processor, max_length))
    collate = indexed_collate(make_collate_fn(tokenizer.pad_token_id))
    batches = (collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
               for start in range(0, len(dataset), batch_size))
    out = Path(cache_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    build_teacher_cache(teacher, verbs, batches, tmp, k=k, vocab_size=vocab_size, temperature=temperature)
    return replace_directory(tmp, out)
