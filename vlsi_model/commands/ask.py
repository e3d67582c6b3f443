"""`vlsi ask`: answer one question about one image file with a local model.

The answer goes to stdout (so `vlsi ask ... > answer.txt` captures only the answer);
timings and notes go to stderr. `--json` prints the whole result as one JSON object on
stdout instead. Exit status: 0 answered, 2 bad image file, 1 model or request error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vlsi_model.commands._common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, add_threads_argument, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ask` to the `vlsi` parser."""
    from vlsi_model.engine import backend_names

    p = subparsers.add_parser("ask", help="answer a question about an image", description=__doc__)
    p.add_argument("--image", required=True, type=Path, help="image file (PNG, JPEG, ...)")
    p.add_argument("--question", required=True, help="question about the image")
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory (default: the shipped student, or the placeholder)")
    p.add_argument("--backend", default="auto", choices=["auto", *backend_names()])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    add_threads_argument(p)
    p.add_argument("--stream", action="store_true", help="print the answer token by token as it is generated")
    p.add_argument("--json", action="store_true", help="print the full result (answer, tokens, timings) as JSON")
    p.set_defaults(func=run)


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB from an image file; ValueError with the reason if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from vlsi_model.defaults import default_model_is_placeholder
    from vlsi_model.engine import EngineError, load_engine

    try:
        image = read_image(args.image)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    options = {"num_threads": args.threads} if args.threads else {}
    try:
        engine = load_engine(args.model, backend=args.backend, device=args.device, **options)
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if getattr(engine, "is_placeholder", False) or (args.model is None and default_model_is_placeholder()):
        print("note: using the untrained PLACEHOLDER model; its answers are meaningless", file=sys.stderr)

    printed = ""

    def stream(text: str, n: int) -> None:
        nonlocal printed
        if text.startswith(printed):
            sys.stdout.write(text[len(printed):])
        else:  # the detokenised prefix changed (rare with byte-level BPE): restart the line
            sys.stdout.write("\n" + text)
        sys.stdout.flush()
        printed = text

    try:
        result = engine.answer(
            image,
            args.question,
            max_new_tokens=args.max_new_tokens,
            on_token=stream if args.stream and not args.json else None,
        )
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        engine.close()

    if args.json:
        print(json.dumps({
            "answer": result.text,
            "token_ids": result.token_ids,
            "num_tokens": result.num_tokens,
            "vision_ms": round(result.vision_ms, 3),
            "prefill_ms": round(result.prefill_ms, 3),
            "decode_ms": round(result.decode_ms, 3),
            "total_ms": round(result.total_ms, 3),
            "tokens_per_s": round(result.tokens_per_s, 2),
            "cancelled": result.cancelled,
            "backend": engine.backend,
            "model": engine.model_name,
        }))
    else:
        if args.stream:
            if printed != result.text:
                sys.stdout.write(("\n" if printed else "") + result.text)
            sys.stdout.write("\n")
        else:
            print(result.text)
        print(
            f"[{engine.backend} {engine.model_name}] vision {result.vision_ms:.1f} ms, "
            f"prefill {result.prefill_ms:.1f} ms, decode {result.decode_ms:.1f} ms "
            f"({result.num_tokens} tokens, {result.tokens_per_s:.1f} tok/s), total {result.total_ms:.1f} ms",
            file=sys.stderr,
        )
    return EXIT_OK
