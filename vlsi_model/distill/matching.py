"""Adaptive, order-preserving layer matching (VLsI) and the paper's ablation variants.

Student targets s = 0..S-1 and teacher targets t = 0..T-1 are *indices into the target
lists* (e.g. student layers [2, 6, ..., 26] and teacher layers [2, 6, ..., 78]). Every
training step, each student target is matched to one teacher target; the loss is the
divergence of each student target to its match, and the gradient flows only through the
matched pairs. `d` below is the [S, T] matrix of mean per-token divergences
(`losses.divergence_matrix`, same op and direction as the loss, so d[s, j] *is* the loss
term the sample would add).

Variants (the paper names them in its ablation table only; the exact definitions are ours):

- "random": each s picks a teacher target uniformly from all T, independently
  (no window, no order, ignores d).
- "uniform": the fixed proportional mapping t(s) = round(s * (T - 1) / (S - 1)), which pins
  the shallowest targets together and the deepest together and spaces the rest evenly;
  t(0) = T - 1 when S = 1 (the only student target follows the deepest teacher target).
  Deterministic, ignores d. Needs S <= T.
- "bottom1": t(s) = argmin_j d[s, j] over all T (ties: lowest index), independently per s.
- "bottom3": t(s) drawn uniformly among the 3 teacher targets with the smallest d[s, :]
  (all of them when T < 3), independently per s.
- "multinomial": t(s) ~ softmax(-d[s, :] / temperature) over all T, with a *fixed*
  temperature (`temperature`, default 1.0), independently per s.
- "window": + search window: as "multinomial", but s may only pick from its static window
  [s, T - S + s], the teacher targets any order-preserving assignment could give it.
  Matches of consecutive student targets may still cross or repeat.
- "order": + order preservation: the dynamic window [start, T - S + s] with start = 0
  for s = 0 and start = (previous match) + 1 afterwards; still the fixed temperature.
- "full" (the paper's method, default): "order" with the adaptive temperature
  tau = scale / (max(d_w) - min(d_w) + eps) over the window's candidates d_w
  (scale = 2, eps = 1e-6), p = softmax(-d_w / tau), exactly as VLSI_METHOD.md states it.
  The logits -d_w / tau then span (max - min)^2 / scale: when the candidates' divergences
  are close (no layer is clearly the right match, typical early in training) the
  distribution is nearly uniform and the student explores; when one candidate is clearly
  closer, the distribution collapses onto it. A fixed temperature does neither.

For "window", "order" and "full", S <= T is required and every match lies in its window:
s <= t(s) <= T - S + s ("window"), start <= t(s) <= T - S + s ("order", "full"), so the
matches of "order" and "full" are strictly increasing.

Randomness: a `torch.Generator` reseeded from (seed, step, micro-batch within the step),
so runs are reproducible and a resumed run draws exactly what the uninterrupted run
would have drawn, with no generator state to checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("random", "uniform", "bottom1", "bottom3", "multinomial", "window", "order", "full")
WINDOWED_VARIANTS = ("window", "order", "full")
ORDERED_VARIANTS = ("order", "full")
DIVERGENCE_FREE_VARIANTS = ("random", "uniform")


@dataclass(frozen=True)
class MatchConfig:
    """Matching options: `variant` (see the module docstring), adaptive-temperature scale/eps, fixed temperature."""

    variant: str = "full"
    scale: float = 2.0
    eps: float = 1e-6
    temperature: float = 1.0  # the fixed temperature of "multinomial", "window" and "order"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"matching variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.scale > 0 or not self.eps > 0 or not self.temperature > 0:
            raise ValueError("scale, eps and temperature must be > 0")


def adaptive_temperature(d: torch.Tensor, scale: float = 2.0, eps: float = 1e-6) -> float:
    """tau = scale / (max(d) - min(d) + eps)."""
    return float(scale / (float(d.max() - d.min()) + eps))


def static_window(s: int, num_student: int, num_teacher: int) -> tuple[int, int]:
    """Inclusive [s, T - S + s]: the teacher targets an order-preserving assignment can give s."""
    return s, num_teacher - num_student + s


def uniform_mapping(num_student: int, num_teacher: int) -> list[int]:
    """The "uniform" variant's fixed assignment (see the module docstring)."""
    if num_student < 1 or num_teacher < num_student:
        raise ValueError(f"uniform matching needs 1 <= S <= T, got S={num_student}, T={num_teacher}")
    if num_student == 1:
        return [num_teacher - 1]
    return [int(round(s * (num_teacher - 1) / (num_student - 1))) for s in range(num_student)]


class LayerMatcher:
    """Draws one teacher target per student target, every step, according to `config.variant`."""

    def __init__(self, config: MatchConfig | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else MatchConfig(**kwargs)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.config.seed)
        self._step = 0
        self._micro = 0

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def needs_divergences(self) -> bool:
        """False for "random" and "uniform", which never look at d (skip computing it)."""
        return self.variant not in DIVERGENCE_FREE_VARIANTS

    def set_step(self, step: int) -> None:
        """Reseed for optimizer step `step`; calls of `match` before the next `set_step` are its micro-batches."""
        self._step = int(step)
        self._micro = 0

    def _reseed(self) -> None:
        key = f"{self.config.seed}:{self._step}:{self._micro}".encode()
        self.generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
        self._micro += 1

    def needed_pairs(self, num_student: int, num_teacher: int) -> torch.Tensor:
        """[S, T] bool: the entries of d this variant can look at (all, or the static windows)."""
        needed = torch.zeros(num_student, num_teacher, dtype=torch.bool)
        if not self.needs_divergences:
            return needed
        if self.variant in WINDOWED_VARIANTS:
            self._check_sizes(num_student, num_teacher)
            for s in range(num_student):
                lo, hi = static_window(s, num_student, num_teacher)
                needed[s, lo : hi + 1] = True
            return needed
        needed[:] = True
        return needed

    def _check_sizes(self, num_student: int, num_teacher: int) -> None:
        if num_student < 1 or num_teacher < 1:
            raise ValueError("need at least one student and one teacher target")
        if self.variant in (*WINDOWED_VARIANTS, "uniform") and num_student > num_teacher:
            raise ValueError(
                f"matching variant {self.variant!r} needs no more student targets than teacher targets "
                f"(S={num_student} > T={num_teacher})"
            )

    def _sample(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=self.generator).item())

    def window(self, s: int, start: int, num_student: int, num_teacher: int) -> tuple[int, int]:
        """Inclusive [lo, hi] of the teacher targets student target `s` may pick, `start` being one
        past the previous student target's match (0 for s = 0; only "order" and "full" use it)."""
        if self.variant in ("bottom1", "bottom3", "multinomial"):
            return 0, num_teacher - 1
        if self.variant == "window":
            return static_window(s, num_student, num_teacher)
        return start, num_teacher - num_student + s

    def probabilities(self, candidates: torch.Tensor) -> torch.Tensor:
        """The distribution a softmax variant ("multinomial", "window", "order", "full") draws a
        candidate from, given the candidates' divergences: softmax(-d / tau), tau adaptive for
        "full", fixed otherwise. Public so that a run's matching can be inspected afterwards (how
        far from uniform the draws were), with the very formula the training used."""
        if self.variant not in ("multinomial", *WINDOWED_VARIANTS):
            raise ValueError(f"matching variant {self.variant!r} does not draw from a softmax")
        tau = (adaptive_temperature(candidates, self.config.scale, self.config.eps) if self.variant == "full"
               else self.config.temperature)
        return torch.softmax(-candidates.double() / tau, dim=0)

    def match(self, d: torch.Tensor | None, num_student: int, num_teacher: int) -> list[int]:
        """One teacher target index per student target (a list of S ints in [0, T)).

        `d` is the [S, T] divergence matrix (entries outside `needed_pairs` may be NaN); it
        may be None for "random" and "uniform".
        """
        self._check_sizes(num_student, num_teacher)
        self._reseed()
        variant = self.variant
        if variant == "random":
            return [int(torch.randint(num_teacher, (1,), generator=self.generator).item()) for _ in range(num_student)]
        if variant == "uniform":
            return uniform_mapping(num_student, num_teacher)
        if d is None:
            raise ValueError(f"matching variant {variant!r} needs the divergence matrix")
        if tuple(d.shape) != (num_student, num_teacher):
            raise ValueError(f"d has shape {tuple(d.shape)}, expected {(num_student, num_teacher)}")
        d = d.detach().to("cpu", torch.float64)
        out: list[int] = []
        start = 0
        for s in range(num_student):
            lo, hi = self.window(s, start, num_student, num_teacher)
            cand = d[s, lo : hi + 1]
            if not torch.isfinite(cand).all():
                raise ValueError(f"divergences for student target {s} (teacher {lo}..{hi}) are not all finite")
            if variant == "bottom1":
                j = int(torch.argmin(cand).item())
            elif variant == "bottom3":
                k = min(3, cand.numel())
                best = torch.topk(-cand, k).indices  # ties resolved by torch.topk's order
                j = int(best[int(torch.randint(k, (1,), generator=self.generator).item())].item())
            else:  # multinomial, window, order, full
                j = self._sample(self.probabilities(cand))
            t = lo + j
            out.append(t)
            start = t + 1
        return out


class MatchRecorder:
    """Records every (step, student target, teacher target) match and summarises them (paper Fig. 5).

    With `path`, records are also appended to a JSON-lines file as they come, and an
    existing file is read back at construction, so a resumed run keeps the statistics of
    the steps before the interruption. When a step is recorded again (a resumed run redoes
    the steps after its last checkpoint), the earlier records of that step and all later
    steps are dropped first, so every step is counted once.
    """

    def __init__(
        self,
        student_layers: Sequence[int],
        teacher_layers: Sequence[int],
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.student_layers = [int(x) for x in student_layers]
        self.teacher_layers = [int(x) for x in teacher_layers]
        self.path = Path(path) if path is not None else None
        self.records: list[tuple[int, int, int]] = []
        self.max_steps: int | None = None
        self.step = 0
        self._truncated_for_step: int | None = None
        if self.path is not None and self.path.is_file():
            self.extend_from_file(self.path)

    def set_progress(self, step: int, max_steps: int) -> None:
        self.step = int(step)
        self.max_steps = int(max_steps)

    def reset(self) -> None:
        """Forget every record (and empty the file): for a fresh run over an old file."""
        self.records = []
        self._truncated_for_step = None
        self._rewrite()

    def extend_from_file(self, path: str | os.PathLike[str]) -> None:
        """Add the records of another recorder's JSON-lines file (e.g. another process's)."""
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                self.records.append((int(rec["step"]), int(rec["s"]), int(rec["t"])))

    def record(self, matches: Sequence[int], step: int | None = None) -> None:
        """Record one forward's matches (teacher target index per student target)."""
        step = self.step if step is None else int(step)
        if len(matches) != len(self.student_layers):
            raise ValueError(f"{len(matches)} matches for {len(self.student_layers)} student targets")
        if self._truncated_for_step != step:
            self._truncated_for_step = step
            if any(r[0] >= step for r in self.records):
                self.records = [r for r in self.records if r[0] < step]
                self._rewrite()
        new = [(step, s, int(t)) for s, t in enumerate(matches)]
        for _, _, t in new:
            if not 0 <= t < len(self.teacher_layers):
                raise ValueError(f"teacher target index {t} out of range")
        self.records.extend(new)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                for st, s, t in new:
                    f.write(json.dumps({"step": st, "s": s, "t": t}) + "\n")

    def _rewrite(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps({"step": st, "s": s, "t": t}) + "\n" for st, s, t in self.records))
        os.replace(tmp, self.path)

    def _counts(self, records: Sequence[tuple[int, int, int]]) -> list[list[int]]:
        counts = [[0] * len(self.teacher_layers) for _ in self.student_layers]
        for _, s, t in records:
            counts[s][t] += 1
        return counts

    @staticmethod
    def _freq(counts: list[list[int]]) -> list[list[float]]:
        return [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]

    def statistics(self) -> dict[str, Any]:
        """Counts and row-normalised frequencies [S x T]: overall, early and late half of training.

        Early = steps < max_steps / 2 (max_steps from `set_progress`; else half of the largest
        recorded step + 1). Also the mean matched teacher target index and layer per student target.
        """
        last = max((r[0] for r in self.records), default=-1)
        total = self.max_steps if self.max_steps else last + 1
        half = total / 2
        early = [r for r in self.records if r[0] < half]
        late = [r for r in self.records if r[0] >= half]

        def mean_of(records: Sequence[tuple[int, int, int]], value: Any) -> list[float | None]:
            out: list[float | None] = []
            for s in range(len(self.student_layers)):
                vs = [value(t) for _, ss, t in records if ss == s]
                out.append(sum(vs) / len(vs) if vs else None)
            return out

        def part(records: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
            counts = self._counts(records)
            return {
                "num_steps": len({r[0] for r in records}),
                "counts": counts,
                "frequency": self._freq(counts),
                "mean_teacher_target": mean_of(records, lambda t: t),
                "mean_teacher_layer": mean_of(records, lambda t: self.teacher_layers[t]),
            }

        return {
            "student_layers": self.student_layers,
            "teacher_layers": self.teacher_layers,
            "max_steps": total,
            "early_steps": f"step < {half:g}",
            "late_steps": f"step >= {half:g}",
            "overall": part(self.records),
            "early": part(early),
            "late": part(late),
        }

    def write(self, out_dir: str | os.PathLike[str], name: str = "matching") -> tuple[Path, Path]:
        """Write `<name>_stats.json` and `<name>_heatmap.png` (early | late panels) into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stats = self.statistics()
        json_path = out / f"{name}_stats.json"
        json_path.write_text(json.dumps(stats, indent=2) + "\n")
        png_path = out / f"{name}_heatmap.png"
        self.plot(png_path, stats)
        return json_path, png_path

    def plot(self, path: str | os.PathLike[str], stats: dict[str, Any] | None = None) -> Path:
        """Heatmap of the match frequencies, early vs late training, axes labelled with layer indices."""
        # A bare Figure (no pyplot): no global backend state, safe in any thread or process.
        from matplotlib.figure import Figure

        stats = stats or self.statistics()
        width = max(6.0, 1.0 + 0.45 * len(self.teacher_layers)) * 2
        fig = Figure(figsize=(width, 1.5 + 0.45 * len(self.student_layers)), layout="constrained")
        axes = fig.subplots(1, 2, squeeze=False)
        image = None
        for ax, key, title in zip(axes[0], ("early", "late"), ("early training", "late training"), strict=True):
            freq = stats[key]["frequency"]
            image = ax.imshow(freq, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
            ax.set_title(f"{title} ({stats[key]['num_steps']} steps)")
            ax.set_xlabel("teacher layer")
            ax.set_ylabel("student layer")
            ax.set_xticks(range(len(self.teacher_layers)), [str(x) for x in self.teacher_layers])
            ax.set_yticks(range(len(self.student_layers)), [str(x) for x in self.student_layers])
        if image is not None:
            fig.colorbar(image, ax=axes[0].tolist(), label="match frequency")
        fig.suptitle("VLsI layer matching: student target -> matched teacher target")
        path = Path(path)
        fig.savefig(path, dpi=100)
        return path
