"""Supervised fine-tuning (SFT): the objective and the short `vlsi train` recipe.

SFT is VLsI's step 3 and the way the project trains its own small models from scratch. The
recipe only wires reusable parts together (torchtune style): a model (a Hugging Face
directory, or a fresh small model from `models.tiny_*_config`), `ConversationDataset`,
`SFTObjective` and `trainer.train`; then it writes the final model as a normal Hugging Face
directory (`from_pretrained` / `load_model_dir` load it) to `<output_dir>/final`.

Config (YAML; relative paths are relative to the current directory):

    model:
      path: runs/student0               # a HF-layout model directory to start from, OR
      from_config:                      # a fresh small model
        family: qwen2_vl                # or qwen2_5_vl
        seed: 0
        architecture: {hidden_size: 128, num_layers: 4, intermediate_size: 512}  # factory kwargs
        train_tokenizer_on: data        # "data" (the train JSON's texts) or "scenes"; OR
        tokenizer: path/to/tokenizer    # a directory with tokenizer.json
        vocab_size: 512
        min_pixels: 3136
        max_pixels: 12544
    data:
      train: data/train.json
      eval: data/val.json               # optional
      max_length: 512
      on_error: raise                   # or skip (counted per reason, logged)
    train: {...}                        # TrainConfig fields (output_dir, max_steps, lr, ...)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlsi_model.data.llava import RecordError, parse_conversations, read_records
from vlsi_model.training.config import (
    ConfigError,
    TrainConfig,
    dataclass_from_dict,
    dataclass_to_dict,
    load_yaml_config,
    save_yaml,
)
from vlsi_model.training.dataset import ConversationDataset, make_collate_fn
from vlsi_model.training.mixture import DataSource, data_paths, data_summary, load_training_data
from vlsi_model.training.trainer import TrainResult, distributed_state, train

log = logging.getLogger(__name__)

FINAL_DIR = "final"
CONFIG_COPY = "config.yaml"


class SFTObjective(torch.nn.Module):
    """Next-token cross-entropy on the response tokens (`labels` != -100) of a Qwen2-VL model.

    The loss is the model's own (mean over the micro-batch's response tokens). Also reports
    `token_acc`, the greedy next-token accuracy on those tokens, computed without gradient.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(**batch, use_cache=False)
        with torch.no_grad():
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            hits = (out.logits[:, :-1].argmax(-1) == targets) & mask
            token_acc = hits.sum().float() / mask.sum().clamp(min=1).float()
        return {"loss": out.loss, "token_acc": token_acc}


@dataclass
class FromConfigSection:
    """A fresh small model built with `models.tiny_qwen2vl_config` / `tiny_qwen25vl_config` /
    `tiny_qwen3vl_config` (and that family's image processor)."""

    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen2_vl"
    seed: int = 0
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    train_tokenizer_on: Literal["data", "scenes"] | None = None
    vocab_size: int = 512
    corpus_scenes: int = 300  # scenes whose texts train the tokenizer with train_tokenizer_on: scenes
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.train_tokenizer_on is None):
            raise ValueError("give exactly one of tokenizer (a directory) and train_tokenizer_on (data or scenes)")
        factory = _factory(self.family)
        allowed = set(inspect.signature(factory).parameters) - {"tokenizer", "token_ids", "vocab_size"}
        unknown = sorted(set(self.architecture) - allowed)
        if unknown:
            raise ValueError(f"architecture: unknown keys {', '.join(unknown)} (valid: {', '.join(sorted(allowed))})")


@dataclass
class ModelSection:
    path: str | None = None
    from_config: FromConfigSection | None = None
    # Keep the vision encoder, merger included, as it is: only the language model trains
    # (`models.freeze_vision`; what fine-tuning a nano-recipe student needs).
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.from_config is None):
            raise ValueError("give exactly one of path (a model directory) and from_config")


@dataclass
class DataSection:
    train: str | list[DataSource]  # one file, or weighted sources (training/mixture.py)
    eval: str | None = None
    max_length: int = 2048
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class SFTConfig:
    model: ModelSection
    data: DataSection
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)


def load_sft_config(source: str | Path | Mapping[str, Any]) -> SFTConfig:
    """An SFTConfig from a YAML file or a mapping; ConfigError names any bad key."""
    if isinstance(source, Mapping):
        return dataclass_from_dict(SFTConfig, source, "config")
    return dataclass_from_dict(SFTConfig, load_yaml_config(source), str(source))


def _factory(family: str) -> Any:
    from vlsi_model.models import tiny_qwen2vl_config, tiny_qwen3vl_config, tiny_qwen25vl_config

    factories = {"qwen2_vl": tiny_qwen2vl_config, "qwen2_5_vl": tiny_qwen25vl_config, "qwen3_vl": tiny_qwen3vl_config}
    return factories[family]


def _tokenizer_texts(section: FromConfigSection, train_jsons: list[str]) -> list[str]:
    """The texts a fresh tokenizer is trained on: the training data's questions and answers, or the scene corpus."""
    if section.train_tokenizer_on == "scenes":
        from vlsi_model.data.question_families import corpus_texts
        return corpus_texts(section.corpus_scenes, seed=0)
    texts = []
    for record in (r for path in train_jsons for r in read_records(Path(path))):
        try:
            _, turns = parse_conversations(record)
        except RecordError:  # bad records are the dataset's to report; skip them here
            continue
        for question, answer in turns:
            texts += [question, answer]
    return texts


def build_model_and_processors(config: SFTConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Any]:
    """(model in float32, tokenizer, image processor) as the `model:` section says."""
    from vlsi_model.checkpoint import load_model_dir, load_tokenizer
    from vlsi_model.models import build_model, make_image_processor
    from vlsi_model.tokenizer import train_bpe_tokenizer

    section = config.model
    if section.path is not None:
        # float32 master weights; mixed precision is accelerate's job (train.mixed_precision)
        return load_model_dir(section.path, dtype=torch.float32)
    fc = section.from_config
    assert fc is not None
    if fc.tokenizer is not None:
        tokenizer = load_tokenizer(Path(fc.tokenizer).expanduser())
    else:
        tokenizer = train_bpe_tokenizer(_tokenizer_texts(fc, data_paths(config.data.train)), vocab_size=fc.vocab_size)
    model_config = _factory(fc.family)(tokenizer=tokenizer, **fc.architecture)
    model = build_model(model_config, seed=fc.seed)
    return model, tokenizer, make_image_processor(min_pixels=fc.min_pixels, max_pixels=fc.max_pixels,
                                                  model_type=fc.family)


def run_sft(
    config: str | Path | Mapping[str, Any] | SFTConfig, resume: bool = False, force_resume: bool = False
) -> TrainResult:
    """Run the SFT recipe; returns the TrainResult. Writes output_dir/config.yaml (the resolved
    config), metrics.jsonl, checkpoints/ and the final model to output_dir/final."""
    from vlsi_model.models import save_model_dir

    cfg = config if isinstance(config, SFTConfig) else load_sft_config(config)
    out = cfg.train.output_path
    state = distributed_state()
    if state.is_main_process:
        save_yaml(cfg.to_dict(), out / CONFIG_COPY)

    model, tokenizer, image_processor = build_model_and_processors(cfg)
    if cfg.model.freeze_vision:
        from vlsi_model.models import freeze_vision

        freeze_vision(model)
    data = cfg.data
    train_set = load_training_data(data.train, tokenizer, image_processor, data.max_length, data.on_error,
                                   seed=cfg.train.seed)
    sources = data_summary(train_set, data.train)
    log.info("training data: %s", sources)
    eval_set = None
    if data.eval is not None:
        eval_set = ConversationDataset(data.eval, tokenizer, image_processor, data.max_length, data.on_error)
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token")

    result = train(
        SFTObjective(model), train_set, make_collate_fn(tokenizer.pad_token_id), cfg.train,
        resume=resume, progress_desc="sft", eval_dataset=eval_set, force_resume=force_resume,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    if state.is_main_process:
        save_model_dir(
            model.eval(), tokenizer, image_processor, out / FINAL_DIR, overwrite=True,
            metadata={"placeholder": False, "recipe": "sft", "freeze_vision": cfg.model.freeze_vision,
                      "steps": result.steps, "final_loss": result.final_loss,
                      "train_records": len(train_set), "skipped": train_set.skipped, "data_sources": sources},
        )
    state.wait_for_everyone()
    return result


__all__ = [
    "DataSection",
    "FromConfigSection",
    "ModelSection",
    "SFTConfig",
    "SFTObjective",
    "build_model_and_processors",
    "load_sft_config",
    "run_sft",
]
