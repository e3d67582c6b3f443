"""`vlsi` command line: one sub-command per module in vlsi_model/commands.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the handler. Modules are imported here, not discovered, so the list
of commands is readable in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module in vlsi_model.commands) in the order `vlsi --help` lists them.
COMMAND_MODULES = ("data", "label", "train", "distill", "eval", "ask", "export", "build_engine", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsi", description="VLsI distillation, evaluation and deployment")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlsi_model.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
