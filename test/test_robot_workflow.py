"""The robot team's whole path, as the README's "Distill a student for your robot" runs it:
bags of camera frames (MCAP and sqlite3, written with the rosbags writer) -> `vlsi data
from-bag` -> `vlsi label` (the shipped student as the teacher) -> `vlsi distill` on labelled +
teacher-labelled data -> `vlsi eval` -> `vlsi export` -> vqa_node answers (ONNX Runtime) about
a replay of the same bag through image_source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ros_harness import ClientHarness, NodeProcess, wait_for

from vlsi_model.cli import main
from vlsi_model.data.bags import write_image_bag
from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene, scene_seed
from vlsi_model.defaults import default_model_path

pytestmark = [pytest.mark.ros, pytest.mark.slow]

NS = "/robot_workflow"
FRAME_ID = "robot_front_cam"


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """The same 12 camera frames (test-split scenes, 320x240, 4x3 grid, 5 Hz) as MCAP and sqlite3."""
    root = tmp_path_factory.mktemp("bags")
    config = SceneConfig(width=320, height=240, layout="grid", grid=(4, 3))
    frames = [(1_700_000_000_000_000_000 + i * 200_000_000, render_scene(generate_scene(scene_seed("test", 7, i),
                                                                                          config)))
              for i in range(12)]
    return {fmt: write_image_bag(root / fmt, frames, fmt=fmt, frame_id=FRAME_ID) for fmt in ("mcap", "sqlite3")}


def tiny_student(root: Path) -> Path:
    """A small random student that shares the shipped student's tokenizer (VLsI needs one vocabulary)."""
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.models import build_model, save_model_dir, tiny_qwen2vl_config

    _, tokenizer, processor = load_model_dir(default_model_path())
    model = build_model(tiny_qwen2vl_config(tokenizer=tokenizer, hidden_size=64, num_layers=2), seed=0)
    return save_model_dir(model, tokenizer, processor, root / "student", metadata={"placeholder": False})


def test_bag_to_student_to_the_node_on_a_replay(bags, tmp_path, ros_context, capsys):
    # 1. frames + questions, no answers
    assert main(["data", "from-bag", str(bags["mcap"]), "--families", "count,caption", "--out",
                 str(tmp_path / "run1"), "--no-progress"]) == 0
    unlabelled = tmp_path / "run1" / "data.json"
    assert len(json.loads(unlabelled.read_text())) == 24
    # 2. the teacher labels them
    labelled = tmp_path / "run1" / "labelled.json"
    assert main(["label", "--teacher", str(default_model_path()), "--data", str(unlabelled), "--out",
                 str(labelled), "--batch-size", "8", "--no-progress"]) == 0
    records = json.loads(labelled.read_text())
    assert len(records) == 24 and all(r["label"]["source"] == "teacher" for r in records)
    # a few labelled frames a person checked (here: the scene generator's ground truth)
    assert main(["data", "scenes", "--out", str(tmp_path / "labels"), "--num", "6", "--split", "val",
                 "--size", "320x240", "--layout", "grid", "--grid", "4x3", "--families", "count,caption"]) == 0
    capsys.readouterr()
    # 3. distill on both, half and half
    student = tiny_student(tmp_path)
    config = {
        "output_dir": str(tmp_path / "distilled"),
        "teacher": {"path": str(default_model_path())},
        "student": {"path": str(student)},
        "data": {"train": [{"path": str(tmp_path / "labels" / "val.json"), "weight": 1.0, "name": "labels"},
                           {"path": str(labelled), "weight": 1.0, "name": "teacher"}], "max_length": 512},
        "verbalizers": {"student": {"layers": [0, 1]}, "teacher": {"layers": [1, 3]}, "chunk_tokens": 64},
        "lora": {"enabled": False},
        "train": {"max_steps": 2, "per_device_batch_size": 2, "warmup_steps": 1, "log_every_steps": 1,
                  "save_every_steps": 0},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(tmp_path / "distill.yaml")]) == 0
    final = tmp_path / "distilled" / "final"
    for step in ("interact", "sft"):  # both sources were drawn from, and counted
        last = json.loads((tmp_path / "distilled" / "runs" / step / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["samples/labels"] + last["samples/teacher"] == 4, last
    # 3b. the teacher's top-k distributions cached at labelling time serve the interaction step
    # (the teacher is not loaded there): label again with --cache, then step 2 reads it.
    cache = tmp_path / "teacher_cache"
    assert main(["label", "--teacher", str(default_model_path()), "--data", str(unlabelled), "--out",
                 str(tmp_path / "cached_labels.json"), "--no-progress", "--cache", str(cache), "--top-k", "16",
                 "--verbalizers", str(tmp_path / "distilled" / "teacher_verbalizers"), "--student", str(student),
                 "--max-length", "512"]) == 0
    cached = {**config, "output_dir": str(tmp_path / "from_cache"),
              "data": {"train": str(tmp_path / "cached_labels.json"), "max_length": 512},
              "teacher_cache": {"enabled": True, "path": str(cache), "k": 16, "coverage": "dataset"}}
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(cached))
    assert main(["distill", "--config", str(tmp_path / "cached.yaml"), "--steps", "verbalize,interact"]) == 0
    assert (tmp_path / "from_cache" / "interaction").is_dir()
    # 4. evaluated on ground truth only
    assert main(["eval", "--model", str(final), "--data", str(tmp_path / "labels" / "val.json"),
                 "--no-progress", "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["references"] == "ground truth"
    assert main(["eval", "--model", str(final), "--data", str(labelled), "--no-progress"]) == 1
    # 5. exported for ONNX Runtime
    assert main(["export", "--model", str(final), "--out", str(tmp_path / "onnx")]) == 0
    # 6. the node answers about the replayed bag (the sqlite3 copy), through ONNX Runtime
    source = NodeProcess("image_source", {"source": "bag", "path": str(bags["sqlite3"]), "bag_timing": "fixed",
                                          "rate_hz": 10.0, "width": 320, "height": 240, "loop": True},
                         extra=["-r", f"__ns:={NS}"], log_path=tmp_path / "source.log")
    node = NodeProcess("vqa_node", {"model_path": str(final), "backend": "onnxruntime",
                                    "engine_dir": str(tmp_path / "onnx"), "max_new_tokens": 8,
                                    "image_qos": "reliable"},
                       extra=["-r", f"__ns:={NS}"], log_path=tmp_path / "vqa.log")
    harness = ClientHarness("workflow_client", namespace=NS)
    try:
        harness.client.wait_until_ready(60)
        response = wait_for(lambda: (lambda r: r if r.success else None)(
            harness.client.ask("How many objects are there?", wait_for_frame_s=10)), 60, what="an answer")
        assert response.image_header.frame_id == FRAME_ID  # the bag's frame, replayed
        assert response.num_tokens >= 1
        assert "onnxruntime" in node.log_text()
    finally:
        harness.close()
        assert node.stop() == 0, node.log_text()
        assert source.stop() == 0, source.log_text()
