"""A bag's camera frames -> an unlabelled dataset: PNG frames + LLaVA JSON with questions, no answers.

What `vlsi data from-bag` runs. Frames are sampled by *bag time* (at most one per `every_s`
seconds of recording, whatever the camera rate), near-duplicates of the last kept frame are
skipped (a robot standing still records the same picture for minutes), and each kept frame
gets the questions of a question file or of question families (`questions.py`). Every record
says where its frame came from (bag, topic, index, bag time, header stamp, frame_id), so a
label or an answer can always be traced back to the recording.

Nothing half-written: the dataset is built in a temporary folder beside the output and moved
into place at the end; a corrupt or truncated bag, an unknown topic or a bad question file
stops with a clear error and leaves no output. A frame the decoder cannot read (unsupported
encoding, truncated data, larger than `max_pixels`) is skipped and counted by reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.data.bags import BagReader
from vlsi_model.data.questions import Question, questions_for_frame
from vlsi_model.fileio import readable_as_umask_allows, replace_directory
from vlsi_model.image_codec import DEFAULT_MAX_IMAGE_PIXELS, ImageConversionError

DATA_FILE = "data.json"
REPORT_FILE = "from_bag.json"
IMAGES_DIR = "images"
THUMBNAIL = (32, 24)  # width, height of the grey thumbnails compared for near-duplicates


@dataclass
class FromBagOptions:
    topic: str | None = None
    every_s: float = 0.0  # keep at most one frame per this many seconds of bag time (0: every frame)
    max_frames: int | None = None
    dedupe: float = 0.0  # skip a frame whose mean absolute thumbnail difference to the last kept is below (0..1)
    questions: Sequence[Question] = ()
    families: Sequence[str] = ()
    per_family: int = 1
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.every_s < 0 or not np.isfinite(self.every_s):
            raise ValueError(f"every must be a finite number >= 0, got {self.every_s}")
        if not 0.0 <= self.dedupe < 1.0:
            raise ValueError(f"dedupe must be in [0, 1), got {self.dedupe}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max must be >= 1, got {self.max_frames}")
        if bool(self.questions) == bool(self.families):
            raise ValueError("give either questions (a question file) or question families, not both or neither")


@dataclass
class FromBagReport:
    bag: str
    topic: str
    frames_read: int = 0
    frames_kept: int = 0
    not_sampled: int = 0  # within `every_s` of the last kept frame
    near_duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable frames by reason
    skip_examples: dict[str, str] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    out: str = ""

    @property
    def frames_per_s(self) -> float:
        return self.frames_read / self.seconds if self.seconds > 0 else 0.0


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, THUMBNAIL, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _skip_reason(exc: ImageConversionError) -> str:
    text = str(exc)
    for needle, reason in (("unsupported image encoding", "unsupported_encoding"), ("larger than the limit",
                           "too_large"), ("truncated", "truncated"), ("compressed depth", "depth_image")):
        if needle in text:
            return reason
    return "undecodable"


def bag_to_dataset(bag: str | Path, out_dir: str | Path, options: FromBagOptions, overwrite: bool = False,
                   progress: bool = True) -> FromBagReport:
    """Write `out_dir/images/*.png`, `out_dir/data.json` and `out_dir/from_bag.json` (the report)."""
    import cv2
    from tqdm import tqdm

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --overwrite to replace it)")
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / IMAGES_DIR).mkdir()
        with BagReader(bag) as reader:
            topic = reader.resolve_topic(options.topic)
            report = FromBagReport(bag=str(Path(bag).expanduser()), topic=topic, out=str(out_dir))
            total = reader.image_topics()[topic][1]
            every_ns = int(options.every_s * 1e9)
            last_time: int | None = None
            last_thumb: np.ndarray | None = None
            records: list[dict[str, Any]] = []
            skipped: Counter[str] = Counter()
            bar = tqdm(total=total, desc=f"frames of {topic}", unit="frame", disable=not progress, dynamic_ncols=True)
            for frame in reader.frames(topic):
                report.frames_read += 1
                bar.update(1)
                if last_time is not None and frame.bag_time_ns - last_time < every_ns:
                    report.not_sampled += 1
                    continue
                try:
                    rgb = frame.rgb(options.max_pixels)
                except ImageConversionError as exc:
                    reason = _skip_reason(exc)
                    skipped[reason] += 1
                    report.skip_examples.setdefault(reason, f"message {frame.index}: {exc}")
                    continue
                thumb = _thumbnail(rgb)
                if options.dedupe > 0 and last_thumb is not None and \
                        float(np.abs(thumb - last_thumb).mean()) < options.dedupe:
                    report.near_duplicates += 1
                    continue
                last_time, last_thumb = frame.bag_time_ns, thumb
                name = f"{IMAGES_DIR}/frame_{frame.index:06d}.png"
                if not cv2.imwrite(str(tmp / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write {tmp / name}")
                origin = {"bag": report.bag, "topic": topic, "index": frame.index, "bag_time_ns": frame.bag_time_ns,
                          "stamp": {"sec": frame.stamp_ns // 1_000_000_000, "nanosec": frame.stamp_ns % 1_000_000_000},
                          "frame_id": frame.frame_id}
                questions = list(options.questions) or questions_for_frame(
                    frame.index, options.families, options.per_family, options.seed)
                for k, question in enumerate(questions):
                    record = {"id": f"frame_{frame.index:06d}_q{k}", "image": name,
                              "conversations": [{"from": "human", "value": f"<image>\n{question.text}"}],
                              "frame": origin}
                    if question.family:
                        record["family"] = question.family
                    records.append(record)
                report.frames_kept += 1
                if options.max_frames is not None and report.frames_kept >= options.max_frames:
                    break
            bar.close()
        report.skipped = dict(skipped)
        report.records = len(records)
        if not records:
            raise ValueError(f"no frame of {topic} in {bag} was kept ({report.frames_read} read; skipped: "
                             f"{report.skipped or 'none'}; {report.not_sampled} not sampled, "
                             f"{report.near_duplicates} near-duplicates)")
        (tmp / DATA_FILE).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        report.seconds = time.perf_counter() - started
        (tmp / REPORT_FILE).write_text(json.dumps({**report.__dict__, "frames_per_s": round(report.frames_per_s, 1),
                                                   "options": {k: v for k, v in options.__dict__.items()
                                                               if k != "questions"},
                                                   "questions": [q.__dict__ for q in options.questions]},
                                                  indent=2) + "\n", encoding="utf-8")
        readable_as_umask_allows(tmp)
        replace_directory(tmp, out_dir)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
