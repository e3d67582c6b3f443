"""`vlsi data ...`: build datasets.

`vlsi data scenes` writes synthetic VQA data: the scenes are the ones the ROS `image_source`
node publishes, so a model trained on them is evaluated on frames drawn by the same
generator (see vlsi_model/data/scenes.py, question_families.py). `vlsi data from-bag` turns a robot's bag into frames
and questions without answers, for `vlsi label` (see vlsi_model/data/from_bag.py). `vlsi data
open-forms` rewrites a dataset's answers in many valid forms (vlsi_model/data/open_answers.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from vlsi_model.data import question_families, scene_dataset, scenes


def parse_size(text: str, minimum: int = 16) -> tuple[int, int]:
    """'112' -> (112, 112); '640x480' -> (640, 480) as width x height."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < minimum:
        raise argparse.ArgumentTypeError(f"expected N or WIDTHxHEIGHT with sides >= {minimum}, got {text!r}")
    return parts[0], parts[1]


def parse_grid(text: str) -> tuple[int, int]:
    """'4' -> (4, 4); '4x3' -> 4 columns, 3 rows."""
    return parse_size(text, minimum=1)


def _families(text: str) -> tuple[str, ...]:
    try:
        return question_families.parse_families(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _word_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        words = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
        bad = [w for w in words if w not in allowed]
        if bad or not words:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return words

    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` and its dataset sub-commands to the `vlsi` parser."""
    data = subparsers.add_parser("data", help="generate datasets", description=__doc__)
    kinds = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    p = kinds.add_parser(
        "scenes",
        help="synthetic VQA scenes (images + LLaVA conversation JSON)",
        description="Render seeded synthetic scenes to DIR/images/<split>_<index>.png and write "
        "DIR/<split>.json (LLaVA conversations, one record per question) and "
        "DIR/<split>_scenes.jsonl (full ground truth per image). Train, val and test seeds never overlap.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--num", required=True, type=_non_negative, help="number of images")
    p.add_argument("--seed", type=_non_negative, default=0, help="run seed (default 0)")
    p.add_argument("--split", choices=scenes.SPLITS, default="train")
    p.add_argument("--size", type=parse_size, default=(112, 112), help="N or WIDTHxHEIGHT (default 112)")
    p.add_argument(
        "--min-objects", type=_non_negative, default=1, help="objects per image, at least (default 1)"
    )
    p.add_argument(
        "--max-objects", type=_non_negative, default=5, help="objects per image, at most (default 5)"
    )
    p.add_argument(
        "--families", type=_families, default=question_families.FAMILIES, help="comma-separated list (default: all)"
    )
    p.add_argument("--per-family", type=_non_negative, default=1, help="questions per family per image")
    p.add_argument(
        "--shapes",
        type=_word_list(scenes.ALL_SHAPES),
        default=scenes.SHAPES,
        help=f"comma-separated subset of {','.join(scenes.ALL_SHAPES)} (default: {','.join(scenes.SHAPES)})",
    )
    p.add_argument(
        "--colors",
        type=_word_list(tuple(scenes.COLOR_RGB)),
        default=scenes.COLORS,
        help=f"comma-separated subset of {','.join(scenes.COLOR_RGB)} (default: all)",
    )
    p.add_argument(
        "--background", choices=("plain", "gradient"), default="gradient", help="grey, or grey with a ramp"
    )
    p.add_argument("--noise", type=float, default=0.0, help="std of pixel noise in grey levels (default 0)")
    p.add_argument(
        "--layout",
        choices=("random", "grid"),
        default="random",
        help="object placement: anywhere, or one object centred in each cell of --grid (the nano family's data)",
    )
    p.add_argument("--grid", type=parse_grid, default=(4, 4),
                   help="grid cells COLSxROWS for --layout grid (default 4x4)")
    p.add_argument("--open-forms", action="store_true",
                   help="answers in one of many valid forms (synonyms, free list order, number words); "
                        "score with `vlsi eval --open-forms`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_scenes)

    b = kinds.add_parser(
        "from-bag",
        help="a bag's camera frames -> PNGs + LLaVA JSON with questions (no answers)",
        description="Read an image topic of a rosbag2 (MCAP or sqlite3) or ROS 1 bag (no ROS install needed), "
        "sample frames by bag time, skip near-duplicates, and write DIR/images/*.png, DIR/data.json (one record "
        "per frame and question, each with its bag, topic, stamp and frame_id) and DIR/from_bag.json (counts).",
    )
    b.add_argument("bag", type=Path, help="rosbag2 folder (or its .mcap / .db3 file) or ROS 1 .bag file")
    b.add_argument("--topic", default=None, help="image topic (default: the bag's only Image / CompressedImage topic)")
    b.add_argument("--every", type=float, default=0.0, metavar="S",
                   help="keep at most one frame per S seconds of bag time (default 0: every frame)")
    b.add_argument("--max", type=int, default=None, metavar="N", help="stop after N kept frames")
    b.add_argument("--dedupe", type=float, default=0.0, metavar="D",
                   help="skip frames whose mean absolute difference to the last kept frame (grey 32x24 thumbnails, "
                        "0..1) is below D; 0.02 skips a still scene (default 0: keep all)")
    qs = b.add_mutually_exclusive_group(required=True)
    qs.add_argument("--questions", type=Path, help="question file: one per line, or YAML (list, or family -> list)")
    qs.add_argument("--families", type=_families, help="question families asked of every frame (comma-separated)")
    b.add_argument("--per-family", type=int, default=1, help="questions per family per frame (default 1)")
    b.add_argument("--seed", type=_non_negative, default=0, help="seed of the family questions (default 0)")
    b.add_argument("--out", required=True, type=Path, help="output folder")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_from_bag)

    o = kinds.add_parser(
        "open-forms",
        help="rewrite a dataset's answers in one of many valid forms (the study's R-open data)",
        description="Each answer becomes one random valid form: 2-3 synonyms per colour / shape / size word, "
        "list answers in a random object order, counts as digits or words; the original is kept as "
        "\"canonical_answer\". Score models on such data with `vlsi eval --open-forms`.",
    )
    o.add_argument("data", type=Path, help="LLaVA JSON/JSONL with \"family\" fields (`vlsi data scenes`, `nano data`)")
    o.add_argument("--out", required=True, type=Path, help="output JSON file")
    o.add_argument("--seed", type=_non_negative, default=0, help="seed of the forms (default 0)")
    o.set_defaults(func=run_open_forms)


def run_scenes(args: argparse.Namespace) -> int:
    """Write the dataset and print a per-family summary; 2 with a message on bad settings."""
    width, height = args.size
    config = scenes.SceneConfig(
        width=width,
        height=height,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        shapes=args.shapes,
        colors=args.colors,
        background=args.background,
        noise=args.noise,
        layout=args.layout,
        grid=args.grid,
    )
    try:
        config.validate()
        json_path = scene_dataset.write_dataset(
            args.out,
            args.num,
            args.seed,
            split=args.split,
            config=config,
            families=args.families,
            per_family=args.per_family,
            progress=args.num >= 500 and not args.no_progress,
            open_forms=args.open_forms,
        )
    except ValueError as exc:
        print(f"vlsi data scenes: error: {exc}", file=sys.stderr)
        return 2
    records = json.loads(json_path.read_text())
    per_family = Counter(r["family"] for r in records)
    forms = " (answers in open forms)" if args.open_forms else ""
    print(f"wrote {args.num} images ({width}x{height}) and {len(records)} questions{forms} to {json_path}")
    for family in question_families.FAMILIES:
        if family in per_family:
            print(f"  {family:<10} {per_family[family]}")
    return 0


def run_from_bag(args: argparse.Namespace) -> int:
    """Write the dataset; 2 with one clear line for a bad bag, topic, question file or option."""
    from vlsi_model.data.bags import BagError
    from vlsi_model.data.from_bag import FromBagOptions, bag_to_dataset
    from vlsi_model.data.questions import QuestionFileError, load_question_file

    try:
        questions = load_question_file(args.questions) if args.questions else ()
        options = FromBagOptions(topic=args.topic, every_s=args.every, max_frames=args.max, dedupe=args.dedupe,
                                 questions=questions, families=args.families or (), per_family=args.per_family,
                                 seed=args.seed)
        report = bag_to_dataset(args.bag, args.out, options, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except (BagError, QuestionFileError, ValueError, FileExistsError) as exc:
        print(f"vlsi data from-bag: error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {reason}" for reason, n in report.skipped.items()) or "none"
    print(f"{report.topic}: read {report.frames_read} frames in {report.seconds:.1f} s "
          f"({report.frames_per_s:.0f} frames/s); kept {report.frames_kept} ({report.not_sampled} not sampled, "
          f"{report.near_duplicates} near-duplicates, undecodable: {skipped})")
    print(f"wrote {report.records} questions to {Path(report.out) / 'data.json'}")
    return 0


def run_open_forms(args: argparse.Namespace) -> int:
    """Write the rewritten dataset; 2 with one line for an unreadable input."""
    from vlsi_model.data.llava import DatasetError
    from vlsi_model.data.open_answers import write_open_forms

    if args.out.resolve() == args.data.resolve():
        print("vlsi data open-forms: error: --out must differ from the input (its answers are kept)", file=sys.stderr)
        return 2
    try:
        n = write_open_forms(args.data, args.out, seed=args.seed)
    except (DatasetError, KeyError, IndexError, TypeError) as exc:
        print(f"vlsi data open-forms: error: {args.data}: not LLaVA conversation records ({exc!r})", file=sys.stderr)
        return 2
    print(f"wrote {n} records with answers in open forms to {args.out}")
    return 0
