"""A small, exact, resumable training loop on `accelerate`, shared by SFT and the VLsI steps.

Why one file of ~850 lines: the loop, its checkpoint format and its resume logic are one contract
(exact resume after a kill depends on all three agreeing); split, the invariants would be scattered.

What a recipe supplies: an `objective` (an nn.Module whose `forward(batch) -> dict` returns a
scalar "loss" and any scalar metrics; it owns the models, and its `requires_grad` flags say
what is trained), a map-style dataset, a collate function and a `TrainConfig`. What this
module does: AdamW + cosine schedule with warmup, gradient accumulation, clipping, mixed
precision and DDP/FSDP via `accelerate`, a deterministic data order, progress, JSON-lines
metrics and checkpoints that resume bit for bit.

Why not `transformers.Trainer`: it fixes the model interface to HF models (the objective
here holds a frozen teacher, verbalizer heads and a student), and its checkpoints are
pickles (`optimizer.pt`, `rng_state.pth`). Why not `Accelerator.save_state`: it also
writes pickles, and loads its RNG files with `weights_only=False`. Loading a checkpoint must
never execute code, so the checkpoint format below is written here (safetensors + JSON).

Data order (`GlobalBatchSampler`): samples form an endless stream of epochs, each a
permutation of the dataset seeded by (seed, epoch) alone. Optimizer step k consumes the
*global batch* = stream positions [k*G, (k+1)*G) with G = per_device_batch_size x
grad_accum_steps x num_processes. The global batch is cut into micro-batches of
per_device_batch_size in order; micro-batch j of it goes to process j % P as that process's
accumulation micro-step j // P. So for a fixed per_device_batch_size and G, every process
count sees the same micro-batches and the same per-step gradient (mean of micro-batch mean
losses) — e.g. 1 process x 2 accumulation steps == 2 processes x 1 — up to float reduction
order. The position after step k is k*G: resuming needs only the step number. (B x A
micro-batches equal one batch of B*A only when every micro-batch weighs the same: a
per-token mean loss weights micro-batches with more response tokens less than one big batch
would. Processes vs accumulation, at fixed B, is exact either way.)

Checkpoint `output_dir/checkpoints/step_<N>/` (N = completed optimizer steps):
  trainable.safetensors   trainable parameters by name (full, gathered under FSDP)
  optimizer.safetensors   AdamW state tensors, key "<param name>::<state name>"
  optimizer.json          param groups (hyper-parameters, parameter names) and non-tensor state
  scheduler.json          LR scheduler state_dict
  rng_state_<rank>.json   python / numpy / torch (and CUDA) RNG states of every process
  trainer_state.json      step, stream position, epoch, elapsed time, last loss, the TrainConfig,
                          process count, dataset length, the objective's optional extra state
  config.yaml             the TrainConfig, for people
  COMPLETE                written last: file names and sizes
It is written into `checkpoints/.tmp-step_<N>/`, completed by COMPLETE, fsynced and renamed:
a killed write leaves only a `.tmp-*` directory, which resume ignores (and removes). Only
`step_<N>` directories holding a COMPLETE whose file sizes match are ever loaded.
Parameter and optimizer state go through `torch.distributed.checkpoint.state_dict`'s full
state-dict helpers, which key the optimizer state by parameter name and gather sharded
(FSDP) state; DeepSpeed's engine keeps its own optimizer, which this format does not cover.

Launching several processes: `accelerate launch --num_processes N ...` on GPUs, or
`torchrun --nproc_per_node N -m vlsi_model.cli train ...`. On a CPU-only machine
`accelerate launch --cpu --num_processes N` starts ONE process (its simple launcher needs
mpirun for more); use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`
or torchrun (this module passes cpu=True to accelerate when several processes run without
CUDA, so they form one gloo group instead of N independent runs; a mismatch is an error).

Objective hooks (all optional):
  set_progress(step, max_steps)   called before each optimizer step (step = 0-based index of the
                                  step about to run; distillation records early vs late matches)
  checkpoint_state() -> dict      JSON-serialisable extra state saved in trainer_state.json ...
  load_checkpoint_state(dict)     ... and handed back on resume
  train(mode) / eval()            the trainer calls objective.train() before training and
                                  objective.eval() around evaluation; override train() to keep
                                  frozen parts (a teacher) in eval mode.
Metrics must have the same keys on every call and every process (they are all-reduced).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlsi_model.fileio import replace_directory
from vlsi_model.training.config import ConfigError, TrainConfig, save_yaml

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_STATE_SEP = "::"
# TrainConfig fields that change the trajectory: resuming with different values is refused unless forced.
EXACTNESS_FIELDS = (
    "per_device_batch_size", "max_steps", "seed", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
    "adam_betas", "adam_eps", "max_grad_norm", "mixed_precision",
)  # fmt: skip


@dataclass
class TrainResult:
    """What `train` returns. The caller saves the final artefacts (the objective holds the models)."""

    steps: int  # completed optimizer steps (== max_steps unless the run had nothing to do)
    final_loss: float  # loss of the last step, averaged over its accumulation window and processes
    metrics_path: Path
    checkpoint_dir: Path | None  # newest checkpoint, None if none was written


# ------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------
class GlobalBatchSampler:
    """Batch sampler yielding this process's micro-batches, step by step (see module docstring).

    Stream position p holds sample `permutation(seed, p // N)[p % N]` (N = dataset length),
    so epochs never drop or repeat samples within themselves and a dataset smaller than a
    global batch still works. Independent of every global RNG.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        num_processes: int,
        process_index: int,
        seed: int,
        start_step: int,
        max_steps: int,
        start_position: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.start_position = start_step * self.global_batch_size if start_position is None else start_position
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_processes

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def position(self, step: int) -> int:
        """Stream position of the first sample of optimizer step `step` (0-based)."""
        return self.start_position + (step - self.start_step) * self.global_batch_size

    def micro_batch(self, step: int, micro_step: int) -> list[int]:
        """Dataset indices of this process's micro-batch `micro_step` of optimizer step `step`."""
        slot = micro_step * self.num_processes + self.process_index
        first = self.position(step) + slot * self.micro_batch_size
        return self.stream_indices(first, first + self.micro_batch_size)

    def stream_indices(self, first: int, stop: int) -> list[int]:
        """Dataset indices at stream positions [first, stop), in stream order."""
        return [int(self.permutation(pos // self.num_samples)[pos % self.num_samples]) for pos in range(first, stop)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.grad_accum_steps):
                yield self.micro_batch(step, micro)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum_steps


def drawn_sample_indices(config: TrainConfig, num_samples: int, num_processes: int = 1) -> list[int]:
    """Sorted distinct dataset indices that a run of `config` draws over all its steps and processes.

    The data order depends only on the seed and the batch geometry (module docstring), so
    the samples a run will read are known before it starts: a teacher cache built for
    these alone costs max_steps x global batch samples instead of the whole dataset.
    """
    sampler = GlobalBatchSampler(num_samples, config.per_device_batch_size, config.grad_accum_steps,
                                 num_processes, 0, config.seed, 0, config.max_steps)
    return sorted(set(sampler.stream_indices(0, config.max_steps * sampler.global_batch_size)))


# ------------------------------------------------------------------------------------------
# Checkpoint files (safetensors + JSON only)
# ------------------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _fsync_write(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # clone: tied weights share storage, which safetensors refuses; contiguous: required by the format
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under output_dir/checkpoints, oldest first.

    A directory counts only if named step_<N> and holding a COMPLETE marker whose listed
    files exist with the listed sizes (a partial copy or a half-deleted checkpoint is not).
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _is_complete(path: Path) -> bool:
    try:
        marker = _read_json(path / COMPLETE_MARKER)
        files = marker["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values (no pickle)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _split_optimizer_state(osd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Name-keyed optimizer state_dict -> (tensors for safetensors, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, per_param in osd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{_STATE_SEP}{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "non_tensor_state": scalars}


def _join_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.rpartition(_STATE_SEP)
        state.setdefault(name, {})[sub] = value
    for name, extra in meta.get("non_tensor_state", {}).items():
        state.setdefault(name, {}).update(extra)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------
def _launched_world_size() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _force_cpu() -> bool:
    """Whether accelerate must be told `cpu=True`.

    accelerate only sets up multi-process CPU training (gloo) when asked for the CPU: a
    launcher (torchrun, `accelerate launch --multi_gpu` on a machine without GPUs) that
    starts several processes on a machine without CUDA would otherwise give N independent
    single-process runs writing into the same output_dir.
    """
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return _launched_world_size() > 1 and not torch.cuda.is_available()


def distributed_state() -> Any:
    """accelerate's process-wide `PartialState`, created as `train` creates it.

    Recipes use it for `is_main_process` / `wait_for_everyone` around `train`. Creating a
    bare `PartialState()` first instead would fix the state without the CPU flag, and a
    multi-process CPU launch would silently fall back to independent processes.
    """
    from accelerate import PartialState

    return PartialState(cpu=_force_cpu())


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------
class _Run:
    """State of one `train` call; methods split the loop into readable parts."""

    def __init__(
        self,
        objective: torch.nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any],
        config: TrainConfig,
        eval_dataset: Dataset | None,
        progress_desc: str,
    ) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.objective = objective
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.config = config
        self.eval_dataset = eval_dataset
        self.progress_desc = progress_desc
        self.out = config.output_path
        self.ckpt_root = self.out / CHECKPOINTS_DIR
        self.metrics_path = self.out / METRICS_FILE
        self.accelerator = Accelerator(
            cpu=_force_cpu(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum_steps,
            # The schedule is defined per optimizer step, whatever the process count: step it
            # ourselves (a prepared scheduler steps num_processes times per optimizer step).
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
        )
        self.num_processes = self.accelerator.num_processes
        if self.num_processes != _launched_world_size():
            raise RuntimeError(
                f"launched as {_launched_world_size()} processes but accelerate set up {self.num_processes}: "
                "the processes would train independently. On CPU, launch with "
                "`accelerate launch --multi_gpu --num_processes N` and ACCELERATE_USE_CPU=1, or torchrun."
            )
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.global_batch_size = config.per_device_batch_size * config.grad_accum_steps * self.num_processes
        self.dataset_len = len(dataset)  # type: ignore[arg-type]
        self._checkpointed: list[tuple[Any, list[tuple[Any, Any]]]] = []
        if self.dataset_len < 1:
            raise ValueError("the training dataset is empty")

    # -- setup -----------------------------------------------------------------------------
    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the objective has no parameters with requires_grad=True: nothing to train")
        return named

    def enable_gradient_checkpointing(self) -> None:
        """On every outermost HF PreTrainedModel inside the objective that has trainable parameters."""
        from transformers import PreTrainedModel

        enabled: list[str] = []
        for name, module in self.objective.named_modules():
            if not isinstance(module, PreTrainedModel) or not module.supports_gradient_checkpointing:
                continue
            if any(e == "" or name.startswith(e + ".") for e in enabled):  # covered by an outer model
                continue
            if not any(p.requires_grad for p in module.parameters()):
                continue
            # Non-reentrant: works with frozen inputs (LoRA, frozen embeddings) without extra hooks.
            # transformers >= 5.2x renamed gradient_* to activation_checkpointing_* (old names warn).
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            configs = {id(c): c for c in (module.config, module.config.get_text_config()) if hasattr(c, "use_cache")}
            self._checkpointed.append((module, [(c, c.use_cache) for c in configs.values()]))
            for c in configs.values():
                c.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
            enabled.append(name)
        if not enabled:
            log.warning("gradient_checkpointing is on but the objective holds no trainable HF PreTrainedModel")

    def restore_models(self) -> None:
        """Undo enable_gradient_checkpointing, so the caller saves (and later serves) a normal model
        (use_cache=False would otherwise end up in its config.json)."""
        for module, saved in self._checkpointed:
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()
            else:
                module.gradient_checkpointing_disable()
            for c, value in saved:
                c.use_cache = value
        self._checkpointed.clear()

    def build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for _, p in self.named_trainable():
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm scales
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, self.config.weight_decay), (no_decay, 0.0))
            if params
        ]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.adam_betas, eps=self.config.adam_eps)

    # -- checkpoints -----------------------------------------------------------------------
    def _state_dict_options(self, **kw: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def save_checkpoint(self, step: int, position: int, elapsed: float, last_loss: float) -> Path:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        acc = self.accelerator
        final = self.ckpt_root / f"step_{step}"
        tmp = self.ckpt_root / f"{_TMP_PREFIX}step_{step}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Collective under FSDP: every process takes part; with cpu_offload only rank 0 keeps the result.
        model_sd = get_model_state_dict(self.model, options=self._state_dict_options(ignore_frozen_params=True))
        optim_sd = get_optimizer_state_dict(self.model, self.raw_optimizer, options=self._state_dict_options())
        _write_json(tmp / f"rng_state_{self.rank}.json", _rng_state())
        if self.is_main:
            names = {n for n, _ in self.named_trainable()}
            _save_tensors(tmp / "trainable.safetensors", {k: v for k, v in model_sd.items() if k in names})
            tensors, meta = _split_optimizer_state(optim_sd)
            _save_tensors(tmp / "optimizer.safetensors", tensors)
            _write_json(tmp / "optimizer.json", meta)
            _write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            objective_state = None
            if hasattr(self.unwrapped, "checkpoint_state"):
                objective_state = self.unwrapped.checkpoint_state()
            _write_json(
                tmp / "trainer_state.json",
                {
                    "format_version": CHECKPOINT_FORMAT_VERSION,
                    "step": step,
                    "position": position,
                    "epoch": position / self.dataset_len,
                    "elapsed_s": elapsed,
                    "last_loss": last_loss,
                    "num_processes": self.num_processes,
                    "global_batch_size": self.global_batch_size,
                    "dataset_len": self.dataset_len,
                    "config": self.config.to_dict(),
                    "objective_state": objective_state,
                },
            )
            save_yaml(self.config.to_dict(), tmp / "config.yaml")
        acc.wait_for_everyone()  # every rank's RNG file is on disk before the marker
        if self.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            _write_json(tmp / COMPLETE_MARKER, {"files": files, "step": step})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            replace_directory(tmp, final)  # the same step saved before (a forced resume) is replaced
            self.prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def prune_checkpoints(self) -> None:
        checkpoints = list_checkpoints(self.out)
        for _, path in checkpoints[: max(0, len(checkpoints) - self.config.keep_last_checkpoints)]:
            shutil.rmtree(path, ignore_errors=True)

    def check_compatible(self, state: Mapping[str, Any], path: Path, force: bool) -> None:
        saved = state.get("config", {})
        current = self.config.to_dict()
        problems = []
        for key in EXACTNESS_FIELDS:
            if key in saved and saved[key] != current[key]:
                problems.append(f"{key} {saved[key]!r} -> {current[key]!r}")
        if state.get("global_batch_size") != self.global_batch_size:
            problems.append(
                f"global batch {state.get('global_batch_size')} -> {self.global_batch_size} "
                f"(per_device_batch_size x grad_accum_steps x {self.num_processes} processes)"
            )
        if state.get("dataset_len") != self.dataset_len:
            problems.append(f"dataset length {state.get('dataset_len')} -> {self.dataset_len}")
        if problems and not force:
            raise ConfigError(
                f"cannot resume {path} exactly, the run changed: {'; '.join(problems)}. Restore the old "
                "settings, or force the resume (force_resume=True, `vlsi train --force-resume`) to continue "
                "with a different trajectory than an uninterrupted run."
            )
        if problems:
            log.warning("forced resume from %s despite changes: %s", path, "; ".join(problems))

    def load_checkpoint(self, path: Path, force: bool) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = _read_json(path / "trainer_state.json")
        if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ConfigError(f"{path}: unsupported checkpoint format {state.get('format_version')!r}")
        self.check_compatible(state, path, force)
        params = _load_tensors(path / "trainable.safetensors")
        names = {n for n, _ in self.named_trainable()}
        if set(params) != names:
            missing, extra = sorted(names - set(params)), sorted(set(params) - names)
            raise ConfigError(
                f"{path}: the checkpoint's trainable parameters do not match the objective's "
                f"(missing {missing[:5]}, unexpected {extra[:5]}); was it written by another recipe or step?"
            )
        # Every process reads the full state from disk (no broadcast needed); frozen weights are
        # not in the file, hence strict=False after the exact name check above.
        set_model_state_dict(self.model, params, options=StateDictOptions(full_state_dict=True, strict=False))
        optim_sd = _join_optimizer_state(_load_tensors(path / "optimizer.safetensors"),
                                         _read_json(path / "optimizer.json"))
        set_optimizer_state_dict(self.model, self.raw_optimizer, optim_sd,
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(_read_json(path / "scheduler.json"))
        if hasattr(self.unwrapped, "load_checkpoint_state") and state.get("objective_state") is not None:
            self.unwrapped.load_checkpoint_state(state["objective_state"])
        return state

    def restore_rng(self, path: Path) -> None:
        rng_file = path / f"rng_state_{self.rank}.json"
        if rng_file.is_file():
            _set_rng_state(_read_json(rng_file))
        else:
            log.warning("%s has no RNG state for process %d (process count changed?): random streams "
                        "will differ from an uninterrupted run", path, self.rank)

    # -- metrics ---------------------------------------------------------------------------
    def prepare_metrics_file(self, keep_up_to_step: int) -> None:
        """Keep the lines of steps <= keep_up_to_step (those the resumed state has seen), drop the rest."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_up_to_step > 0 and self.metrics_path.is_file():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= keep_up_to_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write_metrics(self, record: Mapping[str, Any]) -> None:
        if self.is_main:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=False) + "\n")

    def reduce_mean(self, values: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Mean over processes of each metric, in one all-reduce (keys must match on every process)."""
        keys = sorted(values)
        if not keys:
            return {}
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(self.accelerator.device)
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean objective metrics over the eval set (sample-weighted), prefixed "eval_".

        Batches are dealt round-robin to processes; a process short of one repeats its last
        batch with weight 0, so every process runs the same number of forwards (DDP
        broadcasts buffers on each forward, which must not deadlock).
        """
        from accelerate.utils import send_to_device

        assert self.eval_dataset is not None
        n = len(self.eval_dataset)  # type: ignore[arg-type]
        bs = self.config.per_device_batch_size
        batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        mine = batches[self.rank :: self.num_processes]
        per_rank = math.ceil(len(batches) / self.num_processes)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        if not mine:
            mine = [batches[0]]
        mine = mine + [mine[-1]] * (per_rank - len(mine))
        loader = DataLoader(self.eval_dataset, batch_sampler=mine, collate_fn=self.collate_fn,
                            num_workers=self.config.num_workers, generator=torch.Generator())
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        self.unwrapped.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for batch_indices, weight, batch in zip(mine, weights, loader, strict=True):
                    out = self.model(send_to_device(batch, self.accelerator.device))
                    w = weight * len(batch_indices)
                    for k, v in out.items():
                        v = torch.as_tensor(v).detach().double().reshape(()).cpu()
                        sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + w * v
                    count += w
        finally:
            self.unwrapped.train()
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys] + [count]).to(self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        total_count = float(totals[-1])
        return {f"eval_{k}": float(totals[i]) / max(total_count, 1.0) for i, k in enumerate(keys)}

    # -- main ------------------------------------------------------------------------------
    def run(self, resume: bool, force_resume: bool) -> TrainResult:
        from accelerate.utils import send_to_device, set_seed
        from tqdm.auto import tqdm
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        cfg = self.config
        acc = self.accelerator
        existing = list_checkpoints(self.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.ckpt_root.is_dir():  # debris of killed checkpoint writes (.tmp-step_N) or swaps (.step_N.old-*)
                for p in self.ckpt_root.iterdir():
                    if p.name.startswith("."):
                        shutil.rmtree(p, ignore_errors=True)
        if existing and not resume:
            raise ConfigError(
                f"{self.out} already holds checkpoints of an earlier run (newest {existing[-1][1].name}); "
                "resume it (resume=True, `vlsi train --resume`) or choose another output_dir"
            )
        acc.wait_for_everyone()

        set_seed(cfg.seed, device_specific=True)  # seed + process index: per-process dropout differs
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.objective.train()
        optimizer = self.build_optimizer()
        self.model, self.optimizer = acc.prepare(self.objective, optimizer)
        self.raw_optimizer = optimizer
        self.unwrapped = acc.unwrap_model(self.model)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps,
            min_lr_rate=cfg.min_lr_ratio,
        )
        params = [p for _, p in self.named_trainable()]

        start_step, position, elapsed_before, last_loss = 0, 0, 0.0, float("nan")
        resume_from: Path | None = None
        if resume and existing:
            resume_from = existing[-1][1]
            state = self.load_checkpoint(resume_from, force_resume)
            start_step, position = int(state["step"]), int(state["position"])
            elapsed_before, last_loss = float(state.get("elapsed_s", 0.0)), float(state.get("last_loss", "nan"))
            if self.is_main:
                log.info("resuming from %s (step %d of %d)", resume_from, start_step, cfg.max_steps)
        elif resume and self.is_main:
            log.warning("no complete checkpoint in %s: starting a fresh run", self.ckpt_root)
        self.prepare_metrics_file(keep_up_to_step=start_step)

        sampler = GlobalBatchSampler(
            self.dataset_len, cfg.per_device_batch_size, cfg.grad_accum_steps, self.num_processes, self.rank,
            cfg.seed, start_step, cfg.max_steps, start_position=position,
        )
        # Own generator: a DataLoader iterator otherwise draws its base seed from the global
        # torch RNG, which would shift the stream of a resumed run.
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, generator=torch.Generator())
        batches = iter(loader)
        if resume_from is not None:
            self.restore_rng(resume_from)

        # Several weighted sources (training/mixture.py): count the samples drawn from each, from the
        # start of the run (a resumed run recounts what the earlier part drew: the order is seeded).
        source_name = getattr(self.dataset, "source_name", None)
        counting = GlobalBatchSampler(self.dataset_len, cfg.per_device_batch_size, cfg.grad_accum_steps,
                                      self.num_processes, 0, cfg.seed, 0, cfg.max_steps)
        per_source: Counter[str] = Counter()
        counted_to = 0

        def count_sources(stop: int) -> dict[str, int]:
            nonlocal counted_to
            per_source.update(source_name(i) for i in counting.stream_indices(counted_to, stop))
            counted_to = stop
            return {f"samples/{name}": n for name, n in sorted(per_source.items())}

        has_progress_hook = callable(getattr(self.unwrapped, "set_progress", None))
        bar = tqdm(total=cfg.max_steps, initial=start_step, desc=self.progress_desc, unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        t0 = time.perf_counter()
        t_log, samples_since_log = t0, 0
        checkpoint_dir = existing[-1][1] if (resume and existing) else None
        steps_done = start_step
        try:
            for step in range(start_step, cfg.max_steps):
                if has_progress_hook:
                    self.unwrapped.set_progress(step, cfg.max_steps)
                window: dict[str, torch.Tensor] = {}
                lr = float(optimizer.param_groups[0]["lr"])
                grad_norm = torch.tensor(float("nan"))
                for _ in range(cfg.grad_accum_steps):
                    batch = send_to_device(next(batches), acc.device)
                    with acc.accumulate(self.model):
                        out = self.model(batch)
                        if not isinstance(out, Mapping) or "loss" not in out:
                            raise TypeError("objective.forward(batch) must return a dict with a 'loss' tensor")
                        acc.backward(out["loss"])
                        if acc.sync_gradients:
                            max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
                            grad_norm = acc.clip_grad_norm_(params, max_norm)
                        self.optimizer.step()
                        if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                            self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for k, v in out.items():
                        v = torch.as_tensor(v).detach().float().reshape(())
                        window[k] = window.get(k, torch.zeros((), device=v.device)) + v / cfg.grad_accum_steps
                done = steps_done = step + 1
                samples_since_log += self.global_batch_size
                bar.update(1)
                if done % cfg.log_every_steps == 0 or done == cfg.max_steps:
                    metrics = self.reduce_mean(window)
                    last_loss = metrics["loss"]
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(
                            f"loss is {last_loss} at step {done}: training diverged (lower lr, check the data)"
                        )
                    now = time.perf_counter()
                    record = {
                        "step": done,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": float(torch.as_tensor(grad_norm).float()),
                        "samples_per_s": samples_since_log / max(now - t_log, 1e-9),
                        "elapsed_s": elapsed_before + now - t0,
                        "epoch": sampler.position(done) / self.dataset_len,
                        **{k: v for k, v in metrics.items() if k != "loss"},
                        **(count_sources(sampler.position(done)) if callable(source_name) else {}),
                    }
                    self.write_metrics(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    t_log, samples_since_log = now, 0
                eval_now = cfg.eval_every_steps is not None and done % cfg.eval_every_steps == 0
                if self.eval_dataset is not None and (eval_now or done == cfg.max_steps):
                    eval_metrics = self.evaluate()
                    self.write_metrics({"step": done, **eval_metrics})
                    if self.is_main:
                        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == cfg.max_steps:
                    checkpoint_dir = self.save_checkpoint(
                        done, sampler.position(done), elapsed_before + time.perf_counter() - t0, last_loss
                    )
        finally:
            bar.close()
        acc.wait_for_everyone()
        return TrainResult(
            steps=steps_done,
            final_loss=last_loss,
            metrics_path=self.metrics_path,
            checkpoint_dir=checkpoint_dir,
        )


def train(
    objective: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    config: TrainConfig,
    resume: bool = False,
    progress_desc: str = "train",
    *,
    eval_dataset: Dataset | None = None,
    force_resume: bool = False,
) -> TrainResult:
    """Optimise the trainable parameters of `objective` on `dataset` for config.max_steps steps.

    `objective.forward(batch)` returns {"loss": scalar tensor, **scalar metrics}. With
    `resume`, continues from the newest complete checkpoint in config.output_dir exactly (on
    CPU fp32 the final weights equal an uninterrupted run's bit for bit); without one it
    starts fresh and logs so. A changed config that breaks exactness (batch geometry, seed,
    max_steps, optimiser/schedule settings, dataset length) is a ConfigError unless
    `force_resume`. Without `resume`, an output_dir that already holds checkpoints is a
    ConfigError (never silently mixed with a new run). `eval_dataset` is evaluated every
    config.eval_every_steps and at the end (metrics "eval_*" in metrics.jsonl).
    Run under `accelerate launch` for several processes; see the module docstring for how
    the data is sharded and what a checkpoint holds.
    """
    from accelerate.state import AcceleratorState, GradientState

    run: _Run | None = None
    try:
        run = _Run(objective, dataset, collate_fn, config, eval_dataset, progress_desc)
        return run.run(resume=resume, force_resume=force_resume)
    finally:
        if run is not None:
            run.restore_models()
        # accelerate keeps process-wide singletons (mixed precision, accumulation steps); reset
        # them so a later train() in the same process (the next VLsI step) may use other settings.
        # The distributed setup itself (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


__all__ = [
    "CHECKPOINTS_DIR",
    "EXACTNESS_FIELDS",
    "METRICS_FILE",
    "GlobalBatchSampler",
    "TrainResult",
    "distributed_state",
    "drawn_sample_indices",
    "list_checkpoints",
    "train",
]
