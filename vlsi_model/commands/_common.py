"""Pieces every `vlsi` sub-command shares: exit statuses, argument types, thread setting."""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2  # bad arguments, config or input files: fix the command, not the model


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (a 0 or negative count is always a typo)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for sizes and indices where 0 is meaningful (a DLA core, a limit of 0 = off)."""
    return _int_at_least(text, 0)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")


def apply_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when asked; imports torch only then (commands stay cheap)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
