"""`vlsi distill`: the three VLsI steps (verbalize, interact, sft) from a YAML config.

See vlsi_model/distill/config.py for the config format and the output layout, and
configs/distill_tiny.yaml for an example. `--steps` runs a subset (in pipeline order);
`--resume` skips completed steps and continues an interrupted one from its newest
checkpoint. Several processes / GPUs: run the same command under accelerate, e.g.
`accelerate launch --num_processes 8 -m vlsi_model.cli distill --config X.yaml`.
Exit status: 0 done, 2 bad config, data or model, 1 other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlsi_model.commands._common import EXIT_BAD_INPUT, EXIT_OK, add_threads_argument, apply_torch_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `distill` to the `vlsi` parser."""
    p = subparsers.add_parser("distill", help="VLsI distillation of a student from a teacher (YAML config)",
                              description=__doc__)
    p.add_argument("--config", required=True, type=Path, help="distillation YAML (teacher, student, data, ...)")
    p.add_argument("--steps", default="verbalize,interact,sft",
                   help="comma-separated subset of verbalize,interact,sft (default: all three)")
    p.add_argument("--resume", action="store_true",
                   help="skip completed steps; continue an interrupted step from its newest checkpoint")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the config changed in a way that breaks exact continuation")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlsi_model.data.llava import DatasetError
    from vlsi_model.distill.config import parse_steps
    from vlsi_model.distill.pipeline import run_distill
    from vlsi_model.errors import ModelLoadError
    from vlsi_model.training.config import ConfigError
    from vlsi_model.training.trainer import distributed_state

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    apply_torch_threads(args.threads)
    try:
        steps = parse_steps(args.steps)
        outputs = run_distill(args.config, steps, resume=args.resume or args.force_resume,
                              force_resume=args.force_resume)
    except (ConfigError, DatasetError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"vlsi distill: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if distributed_state().is_main_process:
        for step, path in outputs.items():
            print(f"{step}: {path}")
    return EXIT_OK
