"""What the three VLsI steps share: loading models and data, which weights train, publishing outputs.

Every output directory is built beside its destination and renamed into place
(`publish_output`), so an output that exists is complete (`is_complete`): that is what makes
`--resume` skip finished steps safely.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlsi_model.distill.adapters import BackboneAdapter, unwrap_model
from vlsi_model.distill.config import DTYPES, DistillConfig, LoraSection, TargetSpec
from vlsi_model.distill.verbalizer import VerbalizedHead, Verbalizers, select_target_layers
from vlsi_model.fileio import replace_directory
from vlsi_model.training.config import ConfigError

log = logging.getLogger(__name__)


def process_state() -> Any:
    from vlsi_model.training.trainer import distributed_state

    return distributed_state()


def publish_output(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build an output directory beside `dest` (main process only), then rename it into place."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    return replace_directory(partial, dest)


def load_model(ref_path: str | Path, dtype: str = "float32", device: Any = "cpu") -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, image processor); the trainer moves models to the training device itself."""
    from vlsi_model.checkpoint import load_model_dir

    return load_model_dir(Path(ref_path).expanduser(), device=device, dtype=DTYPES[dtype])


def load_config_vocab(model_dir: str | Path) -> int:
    """The padded vocabulary size in a model directory's config.json (without loading its weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(Path(model_dir).expanduser()), local_files_only=True,
                                        trust_remote_code=False)
    return int(config.get_text_config().vocab_size)


def check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """VLsI compares distributions token by token: both models must use one vocabulary, in one order."""
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens, or another "
            "token order); VLsI needs one shared tokenizer"
        )


def load_dataset(cfg: DistillConfig, tokenizer: Any, image_processor: Any) -> Any:
    from vlsi_model.training.mixture import data_summary, load_training_data

    d = cfg.data
    dataset = load_training_data(d.train, tokenizer, image_processor, d.max_length, d.on_error,
                                 seed=int(cfg.train.get("seed", 0)))
    log.info("training data: %s", data_summary(dataset, d.train))
    return dataset


def target_layers_of(spec: TargetSpec, num_layers: int, who: str) -> list[int]:
    try:
        return select_target_layers(num_layers, spec.stride, spec.start, spec.layers)
    except ValueError as exc:
        raise ConfigError(f"verbalizers.{who}: {exc}") from exc


def new_verbalizers(hidden: int, targets: list[int], residual: bool, seed: int) -> Verbalizers:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Verbalizers(hidden, targets, residual=residual)


def decoder_module_names(model: nn.Module, adapter: BackboneAdapter, leaf_names: Sequence[str]) -> list[str]:
    """Full names of the modules called one of `leaf_names` inside the decoder layers (not the vision tower)."""
    layer_ids = {id(layer) for layer in adapter.decoder_layers(model)}
    names: list[str] = []
    prefixes: list[str] = [n for n, m in model.named_modules() if id(m) in layer_ids]
    wanted = set(leaf_names)
    for name, module in model.named_modules():
        inside = any(name.startswith(p + ".") for p in prefixes)
        if inside and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    return names


def prepare_trainable(
    model: nn.Module, adapter: BackboneAdapter, lora: LoraSection, step: str, seed: int,
    interact_trains: str = "decoder",
) -> tuple[nn.Module, bool]:
    """(model to train, whether it is a PEFT model): LoRA on the decoder, or which weights train in full.

    Step 2 without LoRA trains the decoder layers, plus the token embeddings, final norm and LM
    head when `interact_trains` is "language_model" (`ModelRef.interact_trains`); step 3 trains
    everything (the caller freezes the vision encoder when asked).
    """
    if lora.enabled and step in lora.steps:
        from peft import LoraConfig, get_peft_model

        targets = decoder_module_names(model, adapter, lora.target_modules)
        if not targets:
            raise ConfigError(f"lora.target_modules {lora.target_modules} match no linear layer in the decoder")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(
                model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
            )
        return peft_model, True
    if step == "interact":
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [adapter.decoder_layers(model)]
        if interact_trains == "language_model":
            trained += [unwrap_model(model).get_input_embeddings(), adapter.final_norm(model), adapter.lm_head(model)]
        for module in trained:
            for p in module.parameters():
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, False


def merged(model: nn.Module, is_peft: bool) -> nn.Module:
    return model.merge_and_unload() if is_peft else model


def free_memory(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_complete(path: Path) -> bool:
    return path.is_dir()


def skip_or_refuse(dest: Path, resume: bool, step: str) -> bool:
    """True to skip a completed output; ConfigError for an existing output without resume."""
    if not is_complete(dest):
        return False
    if resume:
        log.info("%s: %s is complete, skipping", step, dest)
        return True
    raise ConfigError(
        f"{dest} already exists (step {step} is complete); pass --resume to skip completed steps, "
        "or remove it (or choose another output_dir) to redo it"
    )


def require_output(path: Path, what: str, step: str) -> None:
    if not is_complete(path):
        raise ConfigError(f"step {step} needs {what} at {path}; run the earlier step(s) first (--steps)")


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def verbalized_heads(model: nn.Module, adapter: BackboneAdapter, verbs: Verbalizers) -> dict[int, VerbalizedHead]:
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    return {t: VerbalizedHead(verbs[t], norm, head) for t in verbs.target_layers}


def check_targets(model: nn.Module, adapter: BackboneAdapter, verbs: Verbalizers, who: str) -> None:
    n = adapter.num_layers(model)
    if max(verbs.target_layers) >= n:
        raise ValueError(f"{who} verbalizers target layers {verbs.target_layers} but the {who} has {n} layers")
    if verbs.hidden_size != adapter.hidden_size(model):
        raise ValueError(f"{who} verbalizers have width {verbs.hidden_size}, the {who} {adapter.hidden_size(model)}")
