"""Recipe of the nano family: data mix, family tokenizer and (partly frozen) SFT from scratch.

Why one file of ~720 lines: it is the nano family's whole recipe (data mix, tokenizer, growth,
shipping, run state) behind one `python -m vlsi_model.recipes.nano` entry point, read top to bottom.

Why this module exists next to `vlsi train` (training/sft.py): shared/NANO_NOTES.md found
that a small Qwen2-VL trained from scratch on VQA alone stays at the answer prior; what gets
it off chance is a dense caption task ("What objects are there?" -> "red circle blue
square") making up ~50% of every batch. `vlsi train` reads one train JSON and cannot freeze
parts of the model, so this recipe adds exactly two things and reuses everything else
(`build_model_and_processors`, `ConversationDataset`, `SFTObjective`, `trainer.train`):

* `prepare_data`: renders a VQA set and a caption set from disjoint train seeds and writes a
  mixed JSON with the requested caption share (the trainer's seeded permutation spreads it
  evenly over batches). The mixed JSON is ordinary LLaVA data, so `vlsi train` can use it.
* `nano.freeze_vision_tower`: keeps the vision encoder (patch embedding + blocks) at its
  random initialisation; with `nano.freeze_vision_merger` its merger too, so only the language
  model trains (`models.freeze_vision`). NANO_NOTES: a linear probe reads shape perfectly from
  the *untrained* tower's tokens, and training erodes it (shape is the bottleneck of the
  binding families); a trained merger alone already does (probe 0.996 -> 0.79).

Command line (also used by scripts/train_default_student.sh):

    python -m vlsi_model.recipes.nano tokenizer --out runs/nano/tokenizer
    python -m vlsi_model.recipes.nano data --out runs/nano/data --num 6000 --caption-num 30000
    python -m vlsi_model.recipes.nano train --config configs/nano/student.yaml [--resume] [--threads 1]
    python -m vlsi_model.recipes.nano blend --out runs/nano/data_4x3/train_mix_both.json \
        runs/nano/data_4x3/train_mix.json runs/nano/data/train_mix.json   # two frame geometries
    python -m vlsi_model.recipes.nano grow --model runs/nano/student_grids/final \
        --out runs/nano/teacher_grown/init --num-layers 8 --hidden-size 256 --num-heads 8 \
        --num-kv-heads 4 --intermediate-size 1024        # a teacher that starts as the student
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlsi_model.commands.data import parse_grid, parse_size
from vlsi_model.fileio import replace_directory
from vlsi_model.growth import GrowthPlan, grow_model_dir
from vlsi_model.recipes.run_state import RunState, StaleRunError, run_state
from vlsi_model.training.config import (
    TrainConfig,
    dataclass_from_dict,
    dataclass_to_dict,
    load_yaml_config,
    save_yaml,
)
from vlsi_model.training.mixture import data_paths
from vlsi_model.training.sft import (
    CONFIG_COPY,
    FINAL_DIR,
    DataSection,
    ModelSection,
    SFTConfig,
    SFTObjective,
    build_model_and_processors,
)

log = logging.getLogger(__name__)

# The question families the default student answers; "caption" is the auxiliary dense task.
VQA_FAMILIES: tuple[str, ...] = ("attribute", "count", "exist", "spatial", "compare")
CAPTION_FAMILY = "caption"
MIX_FILE = "train_mix.json"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _rebase(records: Sequence[Mapping[str, Any]], src_dir: Path, dst_dir: Path) -> list[dict[str, Any]]:
    """Records with `image` made relative to dst_dir (the mixed JSON's folder)."""
    rel = Path(os.path.relpath(src_dir, dst_dir))
    out = []
    for r in records:
        r = dict(r)
        r["image"] = str(rel / r["image"])
        out.append(r)
    return out


def write_mix(
    out_json: str | Path,
    vqa_json: str | Path,
    caption_json: str | Path,
    caption_share: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a LLaVA JSON holding every VQA record plus caption records making up `caption_share`.

    Caption records are drawn without replacement (cycling if there are too few) with a
    seeded RNG, so the same inputs always give the same file. A share of 0 gives VQA only.
    """
    if not 0.0 <= caption_share < 1.0:
        raise ValueError(f"caption_share must be in [0, 1), got {caption_share}")
    out_json, vqa_json, caption_json = Path(out_json), Path(vqa_json), Path(caption_json)
    vqa = json.loads(vqa_json.read_text())
    caps = json.loads(caption_json.read_text()) if caption_share > 0 else []
    want = round(len(vqa) * caption_share / (1.0 - caption_share))
    if want and not caps:
        raise ValueError(f"{caption_json} holds no caption records")
    chosen: list[Any] = []
    rng = np.random.default_rng(seed)
    while len(chosen) < want:
        perm = rng.permutation(len(caps))
        chosen += [caps[int(i)] for i in perm[: want - len(chosen)]]
    records = _rebase(vqa, vqa_json.parent, out_json.parent) + _rebase(chosen, caption_json.parent, out_json.parent)
    return _write_records(out_json, records)


def _write_records(out_json: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Atomic write, one record per line (greppable; a killed run never leaves half a file)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    os.replace(tmp, out_json)
    return out_json


def blend_mixes(out_json: str | Path, mixes: Sequence[str | Path], seed: int = 0) -> Path:
    """Write one LLaVA JSON with an equal number of records from each mix (the smallest mix's size).

    Why: the student is trained on one frame geometry (112x112, a 4x4 grid of image tokens) and
    miscounts on the camera's 4:3 frames (4x3 tokens); a blend of a 4x4 mix and a 4x3 mix teaches
    both without letting the new one crowd out the old. A mix of the smallest size is taken whole,
    in order; the others are subsampled without replacement with one seeded RNG, in the order
    given, so the same inputs always give the same file. Image paths are rebased to out_json.
    """
    out_json = Path(out_json)
    if len(mixes) < 2:
        raise ValueError(f"blend needs at least two mixes, got {len(mixes)}")
    loaded = [(Path(m), json.loads(Path(m).read_text())) for m in mixes]
    n = min(len(records) for _, records in loaded)
    if n == 0:
        raise ValueError(f"empty mix: {next(str(m) for m, r in loaded if not r)}")
    rng = np.random.default_rng(seed)
    blended: list[dict[str, Any]] = []
    for path, records in loaded:
        part = records if len(records) == n else [records[int(i)] for i in rng.permutation(len(records))[:n]]
        blended += _rebase(part, path.parent, out_json.parent)
    return _write_records(out_json, blended)


def prepare_data(
    out_dir: str | Path,
    num_images: int,
    caption_images: int,
    seed: int = 0,
    caption_share: float = 0.5,
    families: Sequence[str] = VQA_FAMILIES,
    progress: bool = False,
    layout: str = "grid",
    dense_families: Sequence[str] = (CAPTION_FAMILY,),
    mix_file: str = MIX_FILE,
    size: tuple[int, int] = (112, 112),
    grid: tuple[int, int] = (4, 4),
) -> Path:
    """Render out_dir/vqa (run seed `seed`) and the dense set (run seed `seed + 1`: other scenes),
    then write out_dir/<mix_file>; returns its path. Skips a part whose JSON already exists,
    so re-running the reproduction script after a crash does not re-render everything.

    `layout` is the scenes' SceneConfig.layout. The nano family uses "grid" (one object per
    28-px image token): with "random" placement the small models never learn shape on a CPU.

    `dense_families` are the whole-scene tasks that make up `caption_share` of the mix, one
    record per family per dense image: ("caption",) (default, out_dir/caption) lists colour and
    shape; adding "describe" also lists every object's size, a signal the caption task never
    asks the LM to carry (out_dir/dense_caption_describe).

    `size` (width, height) and `grid` (columns, rows) set the frames: the default 112x112 4x4 grid is
    one object per image token; 640x480 with a 4x3 grid is the synthetic camera's frame, which the
    processor turns into 4x3 tokens (see `blend_mixes`)."""
    from vlsi_model.data.question_families import parse_families
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    out = Path(out_dir)
    scene_config = SceneConfig(layout=layout, width=size[0], height=size[1], grid=grid)
    families = parse_families(families)
    # Named by its families (like the dense set), so a set of other families is never reused.
    vqa_dir = out / ("vqa" if families == VQA_FAMILIES else "vqa_" + "_".join(families))
    vqa = vqa_dir / "train.json"
    if not vqa.is_file():
        write_dataset(vqa_dir, num_images, seed, "train", scene_config, families=families, progress=progress)
    dense_families = parse_families(dense_families)
    dense_dir = out / ("caption" if dense_families == (CAPTION_FAMILY,) else "dense_" + "_".join(dense_families))
    dense = dense_dir / "train.json"
    if caption_share > 0 and not dense.is_file():
        write_dataset(dense_dir, caption_images, seed + 1, "train", scene_config, families=dense_families,
                      progress=progress)
    return write_mix(out / mix_file, vqa, dense, caption_share, seed)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class NanoSection:
    """What this recipe adds to an SFT config."""

    freeze_vision_tower: bool = False  # patch embedding + vision blocks stay at init; merger + LM train
    # Also keep the merger (the projector into the LM) at its random init, so only the LM trains.
    # Why: a linear probe reads an object's shape from its own image token at 0.996 with the
    # random merger (multi-object grid scenes), but at 0.79 after the merger trained with the LM
    # (the shipped student before this option): training the projector erodes shape first.
    freeze_vision_merger: bool = False

    def __post_init__(self) -> None:
        if self.freeze_vision_merger and not self.freeze_vision_tower:
            raise ValueError("nano.freeze_vision_merger needs nano.freeze_vision_tower: true (a trained tower "
                             "behind a frozen random projector is not a recipe this project measured)")


@dataclass
class NanoConfig:
    """An SFT config (model, data, train) plus the `nano:` section."""

    model: ModelSection
    data: DataSection
    train: TrainConfig
    nano: NanoSection = dataclasses.field(default_factory=NanoSection)

    def sft(self) -> SFTConfig:
        return SFTConfig(model=self.model, data=self.data, train=self.train)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)


def load_nano_config(source: str | Path | Mapping[str, Any]) -> NanoConfig:
    """NanoConfig from a YAML file or mapping; unknown keys are errors that name them."""
    if isinstance(source, Mapping):
        return dataclass_from_dict(NanoConfig, source, "config")
    return dataclass_from_dict(NanoConfig, load_yaml_config(source), str(source))


def run_nano(
    config: str | Path | Mapping[str, Any] | NanoConfig, resume: bool = False, force_resume: bool = False
) -> Any:
    """Train as `run_sft` does (same outputs: config.yaml, metrics.jsonl, checkpoints/, final/),
    honouring the `nano:` section. Resumable exactly like every trainer run."""
    from vlsi_model.models import freeze_vision, save_model_dir
    from vlsi_model.training.dataset import ConversationDataset, make_collate_fn
    from vlsi_model.training.mixture import data_summary, load_training_data
    from vlsi_model.training.trainer import train

    cfg = config if isinstance(config, NanoConfig) else load_nano_config(config)
    out = cfg.train.output_path
    save_yaml(cfg.to_dict(), out / CONFIG_COPY)
    model, tokenizer, image_processor = build_model_and_processors(cfg.sft())
    frozen = freeze_vision(model, include_merger=cfg.nano.freeze_vision_merger) if cfg.nano.freeze_vision_tower else 0
    data = cfg.data
    train_set = load_training_data(data.train, tokenizer, image_processor, data.max_length, data.on_error,
                                   seed=cfg.train.seed)
    eval_set = None
    if data.eval is not None:
        eval_set = ConversationDataset(data.eval, tokenizer, image_processor, data.max_length, data.on_error)
    result = train(
        SFTObjective(model), train_set, make_collate_fn(tokenizer.pad_token_id), cfg.train,
        resume=resume, progress_desc="nano", eval_dataset=eval_set, force_resume=force_resume,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    save_model_dir(
        model.eval(), tokenizer, image_processor, out / FINAL_DIR, overwrite=True,
        metadata={"placeholder": False, "recipe": "nano", "steps": result.steps, "final_loss": result.final_loss,
                  "train_records": len(train_set), "data_sources": data_summary(train_set, data.train),
                  "frozen_vision_params": frozen,
                  "freeze_vision_tower": cfg.nano.freeze_vision_tower,
                  "freeze_vision_merger": cfg.nano.freeze_vision_merger},
    )
    return result


def config_run_state(config: str | Path) -> RunState:
    """`run_state` of a nano recipe YAML (train.output_dir) or a `vlsi distill` YAML (output_dir).

    Lets scripts/train_default_student.sh skip a stage only when its finished run is of this
    config; a run of an edited config stops the script with the differences (StaleRunError).
    """
    raw = load_yaml_config(config)
    if "train" in raw and "model" in raw:
        nano_cfg = load_nano_config(config)
        inputs = [p for p in (nano_cfg.model.path, *data_paths(nano_cfg.data.train), nano_cfg.data.eval) if p]
        return run_state(nano_cfg.train.output_path, nano_cfg.to_dict(),
                         lambda saved: load_nano_config(saved).to_dict(), inputs)
    from vlsi_model.distill.config import load_distill_config
    distill_cfg = load_distill_config(config)
    inputs = [p for p in (distill_cfg.teacher.path, distill_cfg.student.path, *data_paths(distill_cfg.data.train),
                          distill_cfg.data.eval) if p]
    return run_state(distill_cfg.out, distill_cfg.to_dict(), lambda saved: load_distill_config(saved).to_dict(),
                     inputs)


def export_checkpoint(config: str | Path | NanoConfig, checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A HF model directory from a mid-run checkpoint (its trainable.safetensors over a fresh model).

    Lets a running job be evaluated at any checkpoint without stopping it: the recipe's
    model is rebuilt (same seed, same tokenizer) and the trained tensors are loaded over it.
    """
    from safetensors.torch import load_file

    from vlsi_model.models import save_model_dir

    cfg = config if isinstance(config, NanoConfig) else load_nano_config(config)
    model, tokenizer, image_processor = build_model_and_processors(cfg.sft())
    state = load_file(str(Path(checkpoint) / "trainable.safetensors"))
    prefix = "model."  # parameters are named from the objective (SFTObjective.model)
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{checkpoint}: unexpected tensors {unexpected[:5]}")
    return save_model_dir(model.eval(), tokenizer, image_processor, out_dir, overwrite=True,
                          metadata={"placeholder": False, "recipe": "nano", "checkpoint": str(checkpoint)})


# Data, tokenizer, test split and the SFT student: the start of both reproductions below.
_MODEL_CARD_STUDENT_COMMANDS = """\
python -m vlsi_model.recipes.nano tokenizer --out runs/nano/tokenizer
python -m vlsi_model.recipes.nano data --out runs/nano/data --num 8000 --caption-num 20000
vlsi data scenes --out runs/nano/test --num 600 --split test --layout grid \\
    --families attribute,count,exist,spatial,compare,caption
nice -n 5 python -m vlsi_model.recipes.nano train --config configs/nano/student.yaml --threads 1 --resume
"""
# The camera-frame second stage: the start of the default student's last stage and of the teacher.
_MODEL_CARD_GRIDS_COMMANDS = """\
python -m vlsi_model.recipes.nano data --out runs/nano/data_4x3 --num 4000 --caption-num 10000 --seed 10 \\
    --size 640x480 --grid 4x3
python -m vlsi_model.recipes.nano blend --out runs/nano/data_4x3/train_mix_both.json \\
    runs/nano/data_4x3/train_mix.json runs/nano/data/train_mix.json
nice -n 5 python -m vlsi_model.recipes.nano train --config configs/nano/student_grids.yaml --threads 1 --resume
"""
MODEL_CARD_COMMANDS = ("scripts/train_default_student.sh        # all of the below, resumable\n"
                       + _MODEL_CARD_STUDENT_COMMANDS + _MODEL_CARD_GRIDS_COMMANDS + """\
python -m vlsi_model.recipes.nano data --out runs/nano/data_locate --num 8000 --caption-num 20000 \\
    --families attribute,count,exist,spatial,compare,locate --dense-families caption,positions \\
    --mix-file train_mix_positions.json
python -m vlsi_model.recipes.nano data --out runs/nano/data_locate_4x3 --num 4000 --caption-num 10000 --seed 10 \\
    --size 640x480 --grid 4x3 --families attribute,count,exist,spatial,compare,locate \\
    --dense-families caption,positions --mix-file train_mix_positions.json
python -m vlsi_model.recipes.nano blend --out runs/nano/data_locate_4x3/train_mix_positions_both.json \\
    runs/nano/data_locate_4x3/train_mix_positions.json runs/nano/data_locate/train_mix_positions.json
nice -n 5 python -m vlsi_model.recipes.nano train --config configs/nano/student_locate.yaml --threads 1 --resume
python -m vlsi_model.recipes.nano data --out runs/nano/data_locate_s40 --num 8000 --caption-num 20000 --seed 40 \\
    --families attribute,count,exist,spatial,compare,locate --dense-families caption,positions \\
    --mix-file train_mix_positions.json
python -m vlsi_model.recipes.nano data --out runs/nano/data_locate_4x3_s50 --num 4000 --caption-num 10000 --seed 50 \\
    --size 640x480 --grid 4x3 --families attribute,count,exist,spatial,compare,locate \\
    --dense-families caption,positions --mix-file train_mix_positions.json
python -m vlsi_model.recipes.nano blend --out runs/nano/data_locate_4x3_s50/train_mix_positions_both.json \\
    runs/nano/data_locate_4x3_s50/train_mix_positions.json runs/nano/data_locate_s40/train_mix_positions.json
nice -n 5 python -m vlsi_model.recipes.nano train --config configs/nano/student_locate_more.yaml --threads 1 --resume
vlsi data scenes --out runs/nano/test_camera --num 600 --split test --size 640x480 --layout grid --grid 4x3 \\
    --families attribute,count,exist,spatial,compare,caption
for family in locate positions; do
  vlsi data scenes --out runs/nano/test_$family --num 600 --split test --layout grid --families $family
  vlsi data scenes --out runs/nano/test_camera_$family --num 600 --split test --layout grid --size 640x480 \\
      --grid 4x3 --families $family
done
for t in test:test test_camera:camera test_locate:locate test_camera_locate:camera_locate; do
  vlsi eval --model runs/nano/student_locate_more/final --data runs/nano/${t%%:*}/test.json \\
    --out runs/nano/student_locate_more/${t##*:}_results.json --max-samples 1400
done
for t in test_positions:positions test_camera_positions:camera_positions; do  # answers of up to 56 tokens
  vlsi eval --model runs/nano/student_locate_more/final --data runs/nano/${t%%:*}/test.json \\
    --out runs/nano/student_locate_more/${t##*:}_results.json --max-new-tokens 64
done
python -m vlsi_model.recipes.nano ship --model runs/nano/student_locate_more/final \\
    --results runs/nano/student_locate_more/test_results.json \\
    --camera-results runs/nano/student_locate_more/camera_results.json \\
    --extra-results "Where is it? (locate, test split)" runs/nano/student_locate_more/locate_results.json \\
    --extra-results "Where is it? (locate, the synthetic camera's frames)" \\
    runs/nano/student_locate_more/camera_locate_results.json \\
    --extra-results "Where is each object? (positions, test split)" \\
    runs/nano/student_locate_more/positions_results.json \\
    --extra-results "Where is each object? (positions, the synthetic camera's frames)" \\
    runs/nano/student_locate_more/camera_positions_results.json \\
    --earlier-stage runs/nano/student/metrics.jsonl configs/nano/student.yaml \\
    --earlier-stage runs/nano/student_grids/metrics.jsonl configs/nano/student_grids.yaml \\
    --earlier-stage runs/nano/student_locate/metrics.jsonl configs/nano/student_locate.yaml \\
    --metrics runs/nano/student_locate_more/metrics.jsonl --config configs/nano/student_locate_more.yaml \\
    --dest vlsi_model/assets/default_student --notes "$(cat configs/nano/student_card_notes.md)"
""")
# The reproduction of a VLsI-distilled default (DISTILL=1 in the script).
MODEL_CARD_DISTILL_COMMANDS = ("DISTILL=1 scripts/train_default_student.sh   # all of the below, resumable\n"
                               + _MODEL_CARD_STUDENT_COMMANDS + _MODEL_CARD_GRIDS_COMMANDS + """\
python -m vlsi_model.recipes.nano data --out runs/nano/data --num 8000 --caption-num 20000 \\
    --dense-families caption,describe --mix-file train_mix_describe.json
python -m vlsi_model.recipes.nano blend --out runs/nano/data_teacher/train_mix_teacher.json \\
    runs/nano/data/train_mix_describe.json runs/nano/data_4x3/train_mix_both.json
python -m vlsi_model.recipes.nano grow --model runs/nano/student_grids/final --out runs/nano/teacher_grown/init \\
    --num-layers 8 --hidden-size 256 --num-heads 8 --num-kv-heads 4 --intermediate-size 1024
nice -n 5 python -m vlsi_model.recipes.nano train --config configs/nano/teacher_grown.yaml --threads 2 --resume
vlsi distill --config configs/nano/distill_student.yaml --resume --threads 1
vlsi eval --model runs/nano/vlsi_student/final --data runs/nano/test/test.json \\
    --out runs/nano/vlsi_student/test_results.json --max-samples 1400
python -m vlsi_model.recipes.nano ship --model runs/nano/vlsi_student/final \\
    --results runs/nano/vlsi_student/test_results.json --metrics runs/nano/vlsi_student/runs/sft/metrics.jsonl \\
    --config runs/nano/vlsi_student/distill_config.yaml --dest vlsi_model/assets/default_student
""")


def _last_metrics(metrics: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                last = rec
    return last


def _frozen_text(nano: Mapping[str, Any]) -> str:
    if nano.get("freeze_vision_merger") and nano.get("freeze_vision_tower"):
        return ("the whole vision encoder, merger included, stays at its random initialisation "
                "(nano.freeze_vision_tower + nano.freeze_vision_merger); only the language model trains")
    if nano.get("freeze_vision_tower"):
        return ("the vision encoder stays at its random initialisation (nano.freeze_vision_tower), only its "
                "merger and the language model train")
    return "every weight trains"


def _sft_training_section(metrics: Path, config: Path) -> str:
    """Model-card bullets for a student trained by this recipe: from scratch, or (a config with
    `model.path`) a further stage from an earlier model."""
    cfg = load_yaml_config(config)
    last = _last_metrics(metrics)
    wall = last.get("elapsed_s")
    wall_text = f"{wall / 60:.1f} min" if isinstance(wall, (int, float)) else "?"
    loss, token_acc = float(last.get("loss", float("nan"))), float(last.get("token_acc", float("nan")))
    frozen_text = _frozen_text(cfg.get("nano", {}))
    steps = last.get("step", "?")
    start = cfg.get("model", {}).get("path")
    if start:
        train = cfg.get("train", {})
        lr = float(train.get("lr", float("nan")))
        min_lr = lr * float(train.get("min_lr_ratio", 0.1))
        return f"""- Then `{config}`: {steps} more steps from `{start}` (the model above) on
  `{cfg.get("data", {}).get("train")}`, batch {train.get("per_device_batch_size", "?")}, AdamW lr {lr:g}
  ({train.get("warmup_steps", "?")} warmup steps, cosine to {min_lr:g}); {frozen_text}. Wall time: {wall_text}
  on a shared 2-core CPU. Final training loss: {loss:.4f}, response-token accuracy {token_acc:.3f}."""
    return f"""- Recipe: `{config}` (`vlsi_model/recipes/nano.py`): {steps} steps of batch 32, AdamW lr 1e-3
  (50 warmup steps, cosine to 1e-4), betas (0.9, 0.98), wd 0.01, clip 1.0, fp32; 50% of the training
  records are the dense caption task "What objects are there?" (shared/NANO_NOTES.md: VQA alone stays
  at chance); {frozen_text}.
- Data: 8000 train images x 5 question families + 20000 caption images (train seeds), tokenizer
  trained on the train-scene corpus. Wall time: {wall_text} on a shared 2-core CPU.
- Final training loss: {loss:.4f}, response-token accuracy {token_acc:.3f}."""


def _distill_training_section(config: Path) -> str:
    """Model-card bullets for a student distilled by `vlsi distill` (VLsI's three steps)."""
    cfg = load_yaml_config(config)
    steps = cfg.get("steps", {})
    train = cfg.get("train", {})
    runs = Path(config).parent / "runs"
    walls = []
    for step in ("verbalize", "interact", "sft"):
        last = _last_metrics(runs / step / "metrics.jsonl")
        if isinstance(last.get("elapsed_s"), (int, float)):
            walls.append(f"{step} {last['elapsed_s'] / 60:.1f} min")
    sft_last = _last_metrics(runs / "sft" / "metrics.jsonl")
    loss_3, acc_3 = float(sft_last.get("loss", float("nan"))), float(sft_last.get("token_acc", float("nan")))
    matching, loss = cfg.get("matching", {}), cfg.get("loss", {})
    return f"""- Start: the nano student pretrained by SFT (`{cfg.get("student", {}).get("path")}`), distilled
  from the nano teacher (`{cfg.get("teacher", {}).get("path")}`; how both were trained: Reproduce,
  below) with `vlsi distill` (shared/VLSI_METHOD.md): step 1
  verbalization {steps.get("verbalize", {}).get("max_steps", "?")} steps (verb-FFN heads only), step 2 interaction
  {steps.get("interact", {}).get("max_steps", "?")} steps (matching `{matching.get("variant", "full")}`, intermediate
  `{loss.get("intermediate_op", "kld")}` / last `{loss.get("last_op", "kld")}`), step 3 SFT
  {steps.get("sft", {}).get("max_steps", "?")} steps; batch {train.get("per_device_batch_size", "?")}, \
lr {train.get("lr", "?")}, full fine-tuning (no LoRA at this size). Config: `{config}`.
- Wall time on a shared 2-core CPU: {", ".join(walls) or "?"}. Final step-3 loss
  {loss_3:.4f}, response-token accuracy {acc_3:.3f}."""


# The name a model card gives each family a nano student can have (its class: models.MODEL_CLASSES).
_CARD_FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
QWEN3_MODEL_CARD_COMMANDS = (
    "FAMILY=qwen3 scripts/train_default_student.sh   # all four stages, resumable: the commands of the\n"
    "# Qwen2-VL student's card with --size 128x128 --grid 4x4 for its own frames (32-px image tokens),\n"
    "# runs/nano_qwen3 and configs/nano/qwen3_student{,_grids,_locate,_locate_more}.yaml\n")


def model_card(model_dir: Path, results: Mapping[str, Any], metrics: Path, config: Path, notes: str = "",
               earlier_stages: Sequence[tuple[Path, Path]] = (),
               camera_results: Mapping[str, Any] | None = None,
               extra_results: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> str:
    """README.md of a shipped student: what it is, its test accuracy per family against the
    answer prior, how it was trained (exact commands), and what it cannot do.

    `config` is the nano recipe YAML of an SFT-trained student, or the `distill_config.yaml`
    of a VLsI-distilled one (recognised by its `teacher:` section; `metrics` is then unused).
    `earlier_stages` are the (metrics.jsonl, config) pairs of the runs before this one, in training
    order (a model trained in stages); `camera_results` (`vlsi eval` on the synthetic camera's
    640x480 4x3-grid frames) adds a table for the frames the ROS demo really sends; each
    (title, results) of `extra_results` adds a section with the family and template tables."""
    from safetensors import safe_open

    from vlsi_model.evaluation import format_question_type_table, format_table
    from vlsi_model.models import MODEL_CLASSES

    distilled = "teacher" in load_yaml_config(config)
    tensors = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensors += int(np.prod(f.get_slice(k).get_shape()))
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    model_cfg = json.loads((model_dir / "config.json").read_text())
    text, vision = model_cfg.get("text_config", model_cfg), model_cfg["vision_config"]
    model_type = model_cfg.get("model_type", "qwen2_vl")
    family, hf_class = _CARD_FAMILIES[model_type], MODEL_CLASSES[model_type].__name__
    cell = int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))  # pixels per image token
    width = vision.get("embed_dim", vision.get("hidden_size"))
    if distilled:
        commands = MODEL_CARD_DISTILL_COMMANDS
    else:
        commands = QWEN3_MODEL_CARD_COMMANDS if model_type == "qwen3_vl" else MODEL_CARD_COMMANDS
    how = "pretrained from scratch, then VLsI-distilled from a larger teacher," if distilled else "trained from scratch"
    this_stage = _distill_training_section(config) if distilled else _sft_training_section(metrics, config)
    training = "\n".join([_sft_training_section(Path(m), Path(c)) for m, c in earlier_stages] + [this_stage])
    camera_intro = "" if camera_results is None else (
        ";\nits last stage also on the synthetic camera's 640x480 frames with a 4x3 grid (4x3 image tokens)")
    camera = "" if camera_results is None else f"""
## On the synthetic camera's frames

The same questions asked about 640x480 frames with the objects on a 4x3 grid (the `image_source`
node's default; the processor turns them into {4 * cell}x{3 * cell} = 4x3 image tokens), test seeds:

{format_table(camera_results)}
"""
    extra = "".join(f"""
## {title}

{format_table(r)}

{format_question_type_table(r)}
""" for title, r in extra_results)
    return f"""# nano student: the default model of vlsi_ros

A {tensors / 1e6:.2f}M-parameter {family} (text {text['hidden_size']} x {text['num_hidden_layers']} layers,
vision {vision['depth']} x {width}; {size_mb:.1f} MB of float32 safetensors) {how}
on the project's synthetic scenes (1-5 objects: circle/square/triangle, 5 colours, 2 sizes, {4 * cell}x{4 * cell},
one object per cell of a 4x4 grid, i.e. per image token: `SceneConfig(layout="grid")`){camera_intro}.
It is what `vlsi ask`, the ROS node and every backend use when no model is given, so the whole
pipeline runs on a laptop CPU with answers that are better than chance on scenes of that kind.
It knows nothing about real images: for a robot, distill your own student (`vlsi distill`).

Load it like any Hugging Face {family} directory (`{hf_class}.from_pretrained`,
or `vlsi_model.checkpoint.load_model_dir`); it carries its BPE tokenizer (Qwen2-VL specials and chat
template) and its image processor (images resized to <= {4 * cell}x{4 * cell} = 16 image tokens).

## Test accuracy (exact match, greedy, {results['overall']['n']} questions from test seeds never used in training)

"prior" is the accuracy of always giving the family's most frequent answer (the chance level a
model that ignores the image reaches).

{format_table(results)}

Per question template ("top predictions": the model's most frequent answers; one answer for every
question means the template is not learned, whatever the accuracy):

{format_question_type_table(results)}
{camera}{extra}
{notes}

## Training

{training}

## Reproduce

```
{commands}```
"""


def _slug(title: str) -> str:
    """File-name form of a section title: "Where is it? (locate)" -> "where_is_it_locate"."""
    return "_".join(re.findall(r"[a-z0-9]+", title.lower())) or "extra"


def _write_summary(path: Path, results: Mapping[str, Any]) -> None:
    """`vlsi eval` results without the per-question predictions (the package keeps the tables)."""
    summary = {k: v for k, v in results.items() if k != "predictions"}
    path.write_text(json.dumps(summary, indent=1) + "\n")


def ship_student(model_dir: str | Path, results_file: str | Path, metrics: str | Path, config: str | Path,
                 dest: str | Path, notes: str = "", earlier_stages: Sequence[tuple[Path, Path]] = (),
                 camera_results_file: str | Path | None = None,
                 extra_results: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """Copy a trained model directory into the package with its model card and test results.

    `extra_results` are (section title, `vlsi eval` JSON) pairs of further test sets (e.g. the
    locate questions); each becomes a table in the card and `<slug of the title>_results.json`.

    Copied into a temporary sibling and renamed into place, so `defaults.py` never sees a
    half-copied student (it checks config.json only).
    """
    import shutil
    import tempfile

    model_dir, dest = Path(model_dir), Path(dest)
    results = json.loads(Path(results_file).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for f in model_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        _write_summary(tmp / "test_results.json", results)
        camera = None if camera_results_file is None else json.loads(Path(camera_results_file).read_text())
        if camera is not None:
            _write_summary(tmp / "camera_results.json", camera)
        slugs = [_slug(title) for title, _ in extra_results]
        if len(set(slugs)) != len(slugs) or {"test", "camera"} & set(slugs):
            raise ValueError(f"extra results need distinct titles that do not name test/camera results: {slugs}")
        extra = [(title, json.loads(Path(f).read_text())) for title, f in extra_results]
        for slug, (_, extra_result) in zip(slugs, extra, strict=True):
            _write_summary(tmp / f"{slug}_results.json", extra_result)
        (tmp / "README.md").write_text(model_card(model_dir, results, Path(metrics), Path(config), notes,
                                                  earlier_stages, camera, extra))
        # mkdtemp makes 0700 directories: package data must be readable by every user of an install.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        replace_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlsi_model.recipes.nano", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train and save the family tokenizer")
    t.add_argument("--out", required=True, type=Path)
    d = sub.add_parser("data", help="render VQA + caption sets and write the mixed train JSON")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--num", type=int, default=6000, help="VQA images (one question per family each)")
    d.add_argument("--caption-num", type=int, default=30000, help="caption-only images")
    d.add_argument("--caption-share", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--layout", choices=("grid", "random"), default="grid",
                   help="object placement (default grid: one object per 28-px image token)")
    d.add_argument("--families", default=",".join(VQA_FAMILIES),
                   help="comma-separated question families of the VQA images (one question per family each)")
    d.add_argument("--dense-families", default=CAPTION_FAMILY,
                   help="comma-separated whole-scene tasks of the dense share (caption; caption,describe adds sizes)")
    d.add_argument("--mix-file", default=MIX_FILE, help="name of the mixed train JSON in --out")
    d.add_argument("--size", type=parse_size, default=(112, 112), help="frame WIDTHxHEIGHT (default 112x112)")
    d.add_argument("--grid", type=parse_grid, default=(4, 4), help="grid COLSxROWS of the grid layout (default 4x4)")
    b = sub.add_parser("blend", help="one train JSON with as many records from each mix (e.g. 4x4 and 4x3 grids)")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("mixes", nargs="+", type=Path)
    b.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("grow", help="a deeper/wider model computing the same function as a trained one (a teacher)")
    g.add_argument("--model", required=True, type=Path, help="trained model directory to grow")
    g.add_argument("--out", required=True, type=Path)
    for size in dataclasses.fields(GrowthPlan):  # --num-layers ... --intermediate-size
        g.add_argument(f"--{size.name.replace('_', '-')}", type=int, default=None, help="target size (default: keep)")
    g.add_argument("--seed", type=int, default=0, help="init of the new weights")
    r = sub.add_parser("train", help="train from a nano recipe YAML")
    r.add_argument("--config", required=True, type=Path)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--force-resume", action="store_true",
                   help="resume although max_steps/lr/... changed (e.g. shortening a run; not bit-exact then)")
    st = sub.add_parser("state", help="print 'done' when the config's output_dir holds its finished run, 'todo' "
                        "when not; exit 3 naming the differences when it holds a run of another config")
    st.add_argument("--config", required=True, type=Path, help="a nano recipe YAML or a `vlsi distill` YAML")
    e = sub.add_parser("export", help="HF model directory from a mid-run checkpoint")
    e.add_argument("--config", required=True, type=Path)
    e.add_argument("--checkpoint", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path)
    s = sub.add_parser("ship", help="copy a trained student into the package with its model card")
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--results", required=True, type=Path, help="vlsi eval --out JSON on the test split")
    s.add_argument("--metrics", required=True, type=Path, help="the run's metrics.jsonl")
    s.add_argument("--config", required=True, type=Path)
    s.add_argument("--dest", required=True, type=Path)
    s.add_argument("--notes", default="", help="extra markdown for the model card")
    s.add_argument("--earlier-stage", nargs=2, action="append", default=[], type=Path, metavar=("METRICS", "CONFIG"),
                   help="metrics.jsonl and config of a run before --config's (repeat, in training order)")
    s.add_argument("--extra-results", nargs=2, action="append", default=[], metavar=("TITLE", "RESULTS"),
                   help="a further test set's `vlsi eval` JSON and its section title in the card (repeatable)")
    s.add_argument("--camera-results", type=Path, default=None,
                   help="vlsi eval --out JSON on the camera's 640x480 4x3-grid test frames (a second table)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "tokenizer":
        from vlsi_model.nano import save_nano_tokenizer

        print(save_nano_tokenizer(args.out))
    elif args.cmd == "data":
        print(prepare_data(args.out, args.num, args.caption_num, args.seed, args.caption_share, progress=True,
                           families=args.families, layout=args.layout, dense_families=args.dense_families,
                           mix_file=args.mix_file, size=args.size, grid=args.grid))
    elif args.cmd == "blend":
        print(blend_mixes(args.out, args.mixes, args.seed))
    elif args.cmd == "grow":
        plan = GrowthPlan(**{size.name: getattr(args, size.name) for size in dataclasses.fields(GrowthPlan)})
        print(grow_model_dir(args.model, args.out, plan, args.seed))
    elif args.cmd == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_nano(args.config, resume=args.resume, force_resume=args.force_resume)
        print(json.dumps({"steps": result.steps, "final_loss": result.final_loss}))
    elif args.cmd == "state":
        try:
            print(config_run_state(args.config))
        except StaleRunError as exc:
            print(f"{parser.prog} state: {exc}", file=sys.stderr)
            return 3
    elif args.cmd == "ship":
        print(ship_student(args.model, args.results, args.metrics, args.config, args.dest, args.notes,
                           [tuple(stage) for stage in args.earlier_stage], args.camera_results,
                           [(title, Path(f)) for title, f in args.extra_results]))
    else:
        print(export_checkpoint(args.config, args.checkpoint, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
