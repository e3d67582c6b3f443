"""Write a LLaVA JSON's records with their answers removed (the first human turn kept): the
R-unlabelled pool's questions, which `vlsi label` answers (docs/study/preregistration.md, "Data").

    python scripts/study/strip_answers.py runs/rstudy/pool/train_mix.json runs/rstudy/pool/pool_questions.json

The output sits beside the input, so the records' relative image paths stay valid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlsi_model.data.llava import read_records


def strip_answers(records: list[dict]) -> list[dict]:
    """Each record with only its first (human) turn: a question without an answer."""
    return [{**r, "conversations": r["conversations"][:1]} for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    if args.out.resolve().parent != args.data.resolve().parent:
        p.error("write the output beside the input (relative image paths)")
    records = strip_answers(read_records(args.data))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(args.out)
    print(f"{len(records)} questions -> {args.out}")


if __name__ == "__main__":
    main()
