"""Verbalizers: small trained heads that read an intermediate layer out in language space.

VLsI maps the output of an intermediate decoder layer to a next-token distribution with

    verbalized_logits(h) = lm_head(final_norm(VerbFFN(h)))

where `final_norm` and `lm_head` are the backbone's own, frozen and shared by all target
layers, and `VerbFFN` is a gated FFN at the hidden width d without expansion (the paper's
best verbalizer). Two models of different width and depth thereby become comparable as
distributions over one vocabulary.

Design choices the paper leaves open (ours, documented):
- Residual form with a zero-initialised down projection: `VerbFFN(x) = x + down(silu(gate(x))
  * up(x))`. At initialisation the verbalizer is exactly the "logit lens" (final norm + LM
  head applied to the intermediate state), which already gives meaningful distributions
  for the upper layers of a trained model; training learns the correction. A plain small
  random init would instead start from an arbitrary map and waste the first steps (and
  give the matching step garbage divergences if verbalization is short). Same three d x d
  linears as the paper; the residual costs no parameters. `residual=False` gives the plain
  (non-residual) FFN with standard init, for ablations.
- gate and up have no bias, like Qwen's MLP; SiLU activation, like Qwen's MLP.
- Verbalizers are training-only. They are stored *beside* a checkpoint, in
  `<checkpoint>/verbalizers/` (`verbalizers.safetensors` + `verbalizers.json`), never in
  the model's `model.safetensors`, so the deployed student is an unmodified backbone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VERBALIZER_DIRNAME = "verbalizers"
WEIGHTS_FILE = "verbalizers.safetensors"
META_FILE = "verbalizers.json"
FORMAT_VERSION = 1


class VerbFFN(nn.Module):
    """Gated FFN at width d with no expansion: `down(silu(gate(x)) * up(x))` (+ x if residual).

    With `residual=True` (default) `down` starts at zero, so the module starts as the
    identity (see the module docstring for why).
    """

    def __init__(self, hidden_size: int, residual: bool = True) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.residual = residual
        self.gate_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.act = nn.SiLU()
        if residual:
            nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The FFN runs in the parameters' dtype (hidden states of a bf16 backbone are cast).
        h = x.to(self.gate_proj.weight.dtype)
        y = self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
        return h + y if self.residual else y


class Verbalizers(nn.Module):
    """One `VerbFFN` per target decoder layer of one model (ModuleDict keyed by the layer index)."""

    def __init__(self, hidden_size: int, target_layers: Sequence[int], residual: bool = True) -> None:
        super().__init__()
        targets = [int(t) for t in target_layers]
        if not targets:
            raise ValueError("need at least one target layer")
        if len(set(targets)) != len(targets) or targets != sorted(targets):
            raise ValueError(f"target layers must be strictly increasing, got {targets}")
        self.hidden_size = int(hidden_size)
        self.residual = residual
        self.target_layers: list[int] = targets
        self.ffns = nn.ModuleDict({str(t): VerbFFN(hidden_size, residual=residual) for t in targets})

    def __getitem__(self, layer: int) -> VerbFFN:
        return self.ffns[str(int(layer))]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.target_layers)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self[layer](hidden)


class VerbalizedHead(nn.Module):
    """hidden [..., d] -> logits [..., V] = lm_head(norm(verb(hidden))); `verb=None` skips the FFN.

    Holds references to the backbone's own norm and LM head (not copies): they stay frozen
    because the caller sets `requires_grad_(False)` on them, not because this class does.
    A plain Module so `torch.utils.checkpoint` can recompute it per chunk of tokens.
    """

    def __init__(self, verb: nn.Module | None, norm: nn.Module | None, lm_head: nn.Module) -> None:
        super().__init__()
        self.verb = verb
        self.norm = norm
        self.lm_head = lm_head

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.out_features)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.verb is not None:
            hidden = self.verb(hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))


def select_target_layers(
    num_layers: int, stride: int = 4, start: int = 2, layers: Iterable[int] | None = None
) -> list[int]:
    """Decoder layers to verbalize: `layers` if given, else every `stride`-th layer from `start`.

    Default (stride 4, start 2) gives the paper's choice: 7 targets (2, 6, ..., 26) on a
    28-layer model, 20 targets (2, ..., 78) on an 80-layer one. An explicit list wins; it
    must hold distinct in-range indices and is returned sorted. Negative indices are not
    accepted (they hide mistakes when teacher and student depths differ).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layers is not None:
        out = [int(x) for x in layers]
        if not out:
            raise ValueError("the explicit target layer list is empty")
        bad = [x for x in out if not 0 <= x < num_layers]
        if bad:
            raise ValueError(f"target layers {bad} out of range for {num_layers} decoder layers (0..{num_layers - 1})")
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate target layers in {out}")
        return sorted(out)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0 <= start < num_layers:
        raise ValueError(f"start {start} out of range for {num_layers} decoder layers")
    return list(range(start, num_layers, stride))


def verbalizer_dir(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Where the verbalizers of a checkpoint live: `<checkpoint>/verbalizers/`."""
    return Path(checkpoint_dir) / VERBALIZER_DIRNAME


def save_verbalizers(
    verbs: Verbalizers,
    out_dir: str | os.PathLike[str],
    model_type: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `verbalizers.safetensors` + `verbalizers.json` (targets, hidden size, model type) into `out_dir`.

    Give `verbalizer_dir(checkpoint)` as `out_dir` to store them beside a checkpoint.
    Tensors are written contiguous and on CPU; the metadata file is written last, so a
    directory with a metadata file holds complete weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in verbs.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {
        "format_version": FORMAT_VERSION,
        "target_layers": list(verbs.target_layers),
        "hidden_size": verbs.hidden_size,
        "residual": verbs.residual,
        "model_type": model_type,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        **(extra or {}),
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / META_FILE)
    return out


def read_verbalizer_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE} (not a verbalizer directory, or an incomplete save)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def load_verbalizers(
    path: str | os.PathLike[str],
    expect_hidden_size: int | None = None,
    expect_model_type: str | None = None,
) -> Verbalizers:
    """Verbalizers saved by `save_verbalizers` (safetensors only; no pickle), on CPU.

    `expect_*` guard against pairing verbalizers with the wrong model (a teacher's
    verbalizers on the student has a different width; the error says so clearly).
    """
    meta = read_verbalizer_meta(path)
    hidden = int(meta["hidden_size"])
    if expect_hidden_size is not None and hidden != expect_hidden_size:
        raise ValueError(f"{path}: verbalizers are for hidden size {hidden}, the model has {expect_hidden_size}")
    if expect_model_type is not None and meta.get("model_type") not in (None, expect_model_type):
        raise ValueError(f"{path}: verbalizers are for model_type {meta['model_type']!r}, not {expect_model_type!r}")
    verbs = Verbalizers(hidden, meta["target_layers"], residual=bool(meta.get("residual", True)))
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    verbs.load_state_dict(state, strict=True)
    dtype = next(iter(state.values())).dtype
    return verbs.to(dtype)
