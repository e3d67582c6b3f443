"""scripts/study/check_inputs.py: the digests that tell a rebuilt study input from a different one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _check_inputs():
    spec = importlib.util.spec_from_file_location("check_inputs", REPO / "scripts" / "study" / "check_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _write_set(folder: Path, pixel: int, indent: int | None = None, compress_level: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = pixel
    Image.fromarray(image).save(folder / "a.png", compress_level=compress_level)
    records = [{"image": "a.png", "family": "count",
                "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]}]
    (folder / "set.json").write_text(json.dumps(records, indent=indent))
    return folder / "set.json"


def test_a_set_digest_sees_content_not_encoding(tmp_path):
    """The same records and pixels written with another JSON layout or PNG compression hash alike;
    one changed pixel does not."""
    check = _check_inputs()
    first = check.set_digest(_write_set(tmp_path / "a", pixel=10))
    assert check.set_digest(_write_set(tmp_path / "b", pixel=10, indent=2, compress_level=1)) == first
    assert check.set_digest(_write_set(tmp_path / "c", pixel=11)) != first


def test_a_label_digest_sees_answers_not_probabilities(tmp_path):
    check = _check_inputs()
    path = _write_set(tmp_path / "a", pixel=10)
    records = json.loads(path.read_text())
    first = check.labels_digest(path)
    records[0]["label"] = {"source": "teacher", "mean_token_prob": 0.91}
    path.write_text(json.dumps(records))
    assert check.labels_digest(path) == first
    records[0]["conversations"][1]["value"] = "3"
    path.write_text(json.dumps(records))
    assert check.labels_digest(path) != first


def test_only_result_files_are_rescored(tmp_path):
    check = _check_inputs()
    for name in ("vlsi_pool/seed0.json", "vlsi_pool/matching_stats_seed0.json", "teacher/all.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in check.archived_results(tmp_path)] == [
        "teacher/all.json", "vlsi_pool/seed0.json"]
