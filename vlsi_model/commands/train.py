"""`vlsi train`: supervised fine-tuning of a Qwen2-VL model from a YAML recipe config.

See vlsi_model/training/sft.py for the config format and configs/sft_tiny.yaml for an
example. Several processes / GPUs: run the same command under accelerate, e.g.
`accelerate launch --num_processes 8 -m vlsi_model.cli train --config X.yaml` (CPU only:
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m vlsi_model.cli train ...`,
or torchrun). The global batch is per_device_batch_size x grad_accum_steps x processes.
Exit status: 0 done, 2 bad config or data, 1 other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlsi_model.commands._common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    add_threads_argument,
    apply_torch_threads,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `vlsi` parser."""
    p = subparsers.add_parser("train", help="supervised fine-tuning (SFT) from a YAML config", description=__doc__)
    p.add_argument("--config", required=True, type=Path, help="recipe YAML (model, data, train sections)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (fresh start if none)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the config changed in a way that breaks exact continuation")
    p.add_argument("--max-steps", type=positive_int, default=None, help="override train.max_steps")
    p.add_argument("--output-dir", type=Path, default=None, help="override train.output_dir")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, apply overrides, train, save output_dir/final."""

    from vlsi_model.data.llava import DatasetError
    from vlsi_model.errors import ModelLoadError
    from vlsi_model.training.config import ConfigError
    from vlsi_model.training.sft import FINAL_DIR, load_sft_config, run_sft

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    apply_torch_threads(args.threads)
    try:
        config = load_sft_config(args.config)
        overrides = {}
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        if args.output_dir is not None:
            overrides["output_dir"] = str(args.output_dir)
        if overrides:
            config.train = config.train.replace(**overrides)
        result = run_sft(config, resume=args.resume or args.force_resume, force_resume=args.force_resume)
    except (ConfigError, DatasetError, ModelLoadError, ValueError) as exc:
        print(f"vlsi train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from vlsi_model.training.trainer import distributed_state

    if not distributed_state().is_main_process:
        return EXIT_OK
    out = config.train.output_path
    print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; model: {out / FINAL_DIR}; "
          f"metrics: {result.metrics_path}")
    return EXIT_OK
