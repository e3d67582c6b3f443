"""scripts/study/check_inputs.py: the digests that tell a rebuilt study input from a different one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from benchmark_scripts import load_script
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _check_inputs():
    return load_script(REPO / "scripts" / "study" / "check_inputs.py")


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
