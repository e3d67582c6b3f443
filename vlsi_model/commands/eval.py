"""`vlsi eval`: exact-match accuracy per question family of a model on a LLaVA-format file.

Prints a markdown table (family, n, accuracy, answer prior) to stdout and, with --out,
writes the full results (per-family accuracy and counts, overall, every prediction) as
JSON. Records without a "family" field are scored as family "all". Exit status: 0 done,
1 model or data error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlsi_model.commands._common import add_threads_argument, apply_torch_threads, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` to the `vlsi` parser."""
    from vlsi_model.engine import backend_names

    p = subparsers.add_parser("eval", help="accuracy per question family on a LLaVA-format file",
                              description=__doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory (default: the shipped student, or the placeholder)")
    p.add_argument("--data", required=True, type=Path, help="LLaVA JSON/JSONL (e.g. `vlsi data scenes --split test`)")
    p.add_argument("--out", type=Path, default=None, help="write results JSON here")
    p.add_argument("--max-samples", type=positive_int, default=None, help="score only the first N records")
    p.add_argument("--backend", default="torch", choices=backend_names())
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--allow-teacher-labels", action="store_true",
                   help="score against records a teacher labelled (`vlsi label`): agreement, not accuracy")
    p.add_argument("--open-forms", action="store_true",
                   help="also score content: synonyms, list order and number words seen through "
                        "(data from `vlsi data scenes --open-forms`)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlsi_model.data.llava import DatasetError
    from vlsi_model.errors import EngineError
    from vlsi_model.evaluation import evaluate, format_question_type_table, format_table, write_results

    apply_torch_threads(args.threads)
    try:
        results = evaluate(args.model, args.data, max_samples=args.max_samples, backend=args.backend,
                           max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                           allow_teacher_labels=args.allow_teacher_labels, open_forms=args.open_forms)
    except (DatasetError, EngineError, ValueError, OSError) as exc:
        print(f"vlsi eval: {exc}", file=sys.stderr)
        return 1
    if results["references"] != "ground truth":
        print(f"references are a teacher's answers ({results['references']}): the figures are agreement with "
              "it, not accuracy", file=sys.stderr)
    print(format_table(results))
    if results.get("question_types"):
        print("\n" + format_question_type_table(results))
    print(f"{results['overall']['n']} samples in {results['seconds']:.1f} s", file=sys.stderr)
    if args.out is not None:
        print(f"wrote {write_results(results, args.out)}", file=sys.stderr)
    return 0
