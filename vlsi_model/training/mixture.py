"""Training data from several sources in chosen proportions (labelled + teacher-labelled records).

A robot team has a few hundred labelled frames and tens of thousands the teacher labelled.
Concatenating them lets the big source drown the small one; a config gives each source a
weight instead:

    data:
      train:
        - {path: data/labelled.json, weight: 0.5, name: labels}
        - {path: data/teacher_labelled.json, weight: 0.5, name: teacher}

`MixedDataset` gives each source a share of the mix equal to its weight's share: with N records
in all, source i fills round(w_i / sum(w) * N) slots by cycling through a seeded permutation of
its records (a small source repeats, a big one is sub-sampled, the same way in every epoch).
The trainer's order over the slots stays the seeded, resumable GlobalBatchSampler order, and it
logs the cumulative samples drawn per source (`samples/<name>` in metrics.jsonl). A plain path
(`train: data.json`) is one source, as before.

Teacher labels are counted per source (`label.source: teacher`, written by `vlsi label`), so the
run's metadata says how much of the training signal was the teacher's, never ground truth.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vlsi_model.data.llava import read_records
from vlsi_model.training.dataset import ConversationDataset


@dataclass
class DataSource:
    path: str
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"data source {self.path}: weight must be a positive number, got {self.weight}")
        if not self.name:
            self.name = Path(self.path).stem


def count_teacher_labelled(path: str | Path) -> int:
    """Records of a data file whose answer came from a teacher (`vlsi label`)."""
    from vlsi_model.data.labelling import is_teacher_labelled

    return sum(1 for r in read_records(Path(path).expanduser()) if is_teacher_labelled(r))


class MixedDataset(Dataset):
    """Slots over several ConversationDatasets in proportion to their weights (module docstring)."""

    def __init__(self, sources: Sequence[tuple[DataSource, ConversationDataset]], seed: int = 0) -> None:
        if not sources:
            raise ValueError("no data sources")
        names = [s.name for s, _ in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names must be unique, got {names}")
        self.sources = list(sources)
        total = sum(len(d) for _, d in sources)
        weight_sum = sum(s.weight for s, _ in sources)
        pairs = []
        self.summary: dict[str, dict[str, Any]] = {}
        for k, (source, dataset) in enumerate(sources):
            slots = max(1, round(source.weight / weight_sum * total))
            order = np.random.default_rng([seed, k]).permutation(len(dataset))
            pairs += [(k, int(order[j % len(dataset)])) for j in range(slots)]
            self.summary[source.name] = {"path": source.path, "records": len(dataset), "slots": slots,
                                         "teacher_labelled": count_teacher_labelled(source.path)}
        for item in self.summary.values():
            item["share"] = round(item["slots"] / len(pairs), 4)
        self._pairs = np.asarray(pairs, dtype=np.int64)
        skipped: Counter[str] = Counter()
        for _, dataset in sources:
            skipped.update(dataset.skipped)
        self.skipped = dict(skipped)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, j = self._pairs[index]
        return self.sources[int(k)][1][int(j)]

    def num_tokens(self, index: int) -> int:
        k, j = self._pairs[index]
        return self.sources[int(k)][1].num_tokens(int(j))

    def source_name(self, index: int) -> str:
        """Name of the source slot `index` draws from (the trainer counts samples per source)."""
        return self.sources[int(self._pairs[index][0])][0].name


def load_training_data(train: str | Sequence[DataSource], tokenizer: Any, image_processor: Any, max_length: int,
                       on_error: str = "raise", seed: int = 0) -> ConversationDataset | MixedDataset:
    """The dataset a config's `data.train` names: one file, or a weighted mix of sources."""
    if isinstance(train, (str, Path)):
        return ConversationDataset(train, tokenizer, image_processor, max_length, on_error)
    return MixedDataset([(s, ConversationDataset(s.path, tokenizer, image_processor, max_length, on_error))
                         for s in train], seed=seed)


def data_paths(train: str | Sequence[DataSource]) -> list[str]:
    """The files a `data.train` value reads."""
    return [str(train)] if isinstance(train, (str, Path)) else [s.path for s in train]


def data_summary(dataset: Any, train: str | Sequence[DataSource]) -> dict[str, Any]:
    """Per-source records, slots, shares and teacher-labelled counts, for logs and model metadata."""
    if isinstance(dataset, MixedDataset):
        return dataset.summary
    path = str(train)
    return {Path(path).stem: {"path": path, "records": len(dataset), "slots": len(dataset), "share": 1.0,
                              "teacher_labelled": count_teacher_labelled(path)}}
