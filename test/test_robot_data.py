"""Robot data without a ROS install: bags in (rosbag2 MCAP / sqlite3, ROS 1), unlabelled datasets
out (`vlsi data from-bag`), a teacher's labels (`vlsi label`), weighted data sources in training,
and evaluation that never takes a teacher's answer for ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlsi_model.cli import main
from vlsi_model.data.bags import BagError, BagReader, write_image_bag
from vlsi_model.data.from_bag import FromBagOptions, bag_to_dataset
from vlsi_model.data.labelling import LabelReport, LocalTeacher, label_file
from vlsi_model.data.questions import load_question_file, questions_for_frame
from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene

T0 = 1_700_000_000_000_000_000  # bag times (ns)


def scene(i: int, width: int = 160, height: int = 120) -> np.ndarray:
    return render_scene(generate_scene(i, SceneConfig(width=width, height=height)))


def recording(n: int, hold: int = 1, period_ns: int = 100_000_000) -> list[tuple[int, np.ndarray]]:
    """n frames `period_ns` apart; each scene held for `hold` frames (a robot standing still)."""
    return [(T0 + i * period_ns, scene(i // hold)) for i in range(n)]


@pytest.mark.parametrize("fmt", ["mcap", "sqlite3", "ros1"])
@pytest.mark.parametrize("compressed", [False, True])
def test_bags_of_every_format_give_back_their_frames(tmp_path, fmt, compressed):
    frames = recording(6)
    path = write_image_bag(tmp_path / ("run.bag" if fmt == "ros1" else "run"), frames, fmt=fmt,
                           compressed=compressed, frame_id="front_cam")
    with BagReader(path) as bag:
        kind = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        assert bag.image_topics() == {"/camera/image_raw": (kind, 6)}
        got = list(bag.frames())
    assert [f.bag_time_ns for f in got] == [t for t, _ in frames] == [f.stamp_ns for f in got]
    assert {f.frame_id for f in got} == {"front_cam"}
    for f, (_, rgb) in zip(got, frames, strict=True):
        error = np.abs(f.rgb().astype(int) - rgb).mean()
        assert error == 0 if not compressed else error < 4  # JPEG


def test_bag_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(BagError, match="bag not found"):
        BagReader(tmp_path / "nope")
    path = write_image_bag(tmp_path / "run", recording(3))
    with BagReader(path) as bag, pytest.raises(BagError, match=r"no topic /front.*image topics: /camera/image_raw"):
        bag.resolve_topic("/front")
    mcap = next(path.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])  # truncated mid-recording
    with pytest.raises(BagError, match="corrupt or truncated|cannot open"), BagReader(path) as bag:
        list(bag.frames())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metadata.yaml").write_text("this: is not a bag")
    with pytest.raises(BagError, match="cannot open bag"):
        BagReader(garbage)


def test_from_bag_samples_by_bag_time_skips_still_frames_and_records_the_origin(tmp_path):
    bag = write_image_bag(tmp_path / "run", recording(30, hold=3), frame_id="cam0")
    options = FromBagOptions(every_s=0.15, dedupe=0.02, families=("count", "exist"), per_family=1)
    report = bag_to_dataset(bag, tmp_path / "ds", options, progress=False)
    assert report.frames_read == 30
    # Per scene (3 frames 0.1 s apart): the first is kept, the second is within 0.15 s of it (not
    # sampled), the third is 0.2 s later but shows the same scene (near-duplicate).
    assert (report.frames_kept, report.not_sampled, report.near_duplicates) == (10, 10, 10)
    records = json.loads((tmp_path / "ds" / "data.json").read_text())
    assert len(records) == 2 * report.frames_kept
    first = records[0]
    assert first["conversations"] == [{"from": "human", "value": "<image>\n" + first["conversations"][0]["value"]
                                      .split("\n", 1)[1]}]
    assert first["frame"]["topic"] == "/camera/image_raw" and first["frame"]["frame_id"] == "cam0"
    assert first["frame"]["stamp"] == {"sec": T0 // 10**9, "nanosec": 0} and first["family"] in ("count", "exist")
    assert (tmp_path / "ds" / first["image"]).is_file()
    assert json.loads((tmp_path / "ds" / "from_bag.json").read_text())["frames_kept"] == 10
    # a frame's questions depend on its index only, not on which frames were kept before it
    assert [q.text for q in questions_for_frame(12, ("count", "exist"))] == \
        [r["conversations"][0]["value"].split("\n", 1)[1] for r in records if r["frame"]["index"] == 12]
    with pytest.raises(FileExistsError):
        bag_to_dataset(bag, tmp_path / "ds", options, progress=False)


def test_question_files_text_and_yaml(tmp_path):
    text = tmp_path / "q.txt"
    text.write_text("# robot questions\nIs the door open?\n\nIs the door open?\nHow many people are there?  # count\n")
    assert [q.text for q in load_question_file(text)] == ["Is the door open?", "How many people are there?"]
    families = tmp_path / "q.yaml"
    families.write_text(yaml.safe_dump({"door": ["Is the door open?"], "people": ["How many people are there?"]}))
    assert [(q.text, q.family) for q in load_question_file(families)] == [
        ("Is the door open?", "door"), ("How many people are there?", "people")]


def test_from_bag_cli_counts_undecodable_frames_and_leaves_nothing_on_a_bad_bag(tmp_path, capsys):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Image, Header, Time = (store.types[t] for t in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                    "builtin_interfaces/msg/Time"))
    path = tmp_path / "mixed"
    with Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=store)
        for i in range(4):
            rgb = scene(i)
            encoding = "rgb8" if i % 2 == 0 else "yuv444_made_up"
            msg = Image(header=Header(stamp=Time(sec=i, nanosec=0), frame_id="cam"), height=120, width=160,
                        encoding=encoding, is_bigendian=0, step=480, data=rgb.reshape(-1))
            writer.write(conn, T0 + i, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    questions = tmp_path / "q.txt"
    questions.write_text("What objects are there?\n")
    assert main(["data", "from-bag", str(path), "--questions", str(questions), "--out", str(tmp_path / "ds"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept 2" in out and "2 unsupported_encoding" in out
    assert len(json.loads((tmp_path / "ds" / "data.json").read_text())) == 2
    assert main(["data", "from-bag", str(path), "--topic", "/other", "--questions", str(questions),
                 "--out", str(tmp_path / "ds2"), "--no-progress"]) == 2
    assert "no topic /other" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists() and not list(tmp_path.glob(".ds2*"))


class CountingTeacher:
    """A LocalTeacher that counts the questions it was asked (resume must not ask again)."""

    def __init__(self, inner: LocalTeacher) -> None:
        self.inner, self.name, self.asked = inner, inner.name, 0

    def answer_batch(self, requests, images):
        self.asked += len(requests)
        return self.inner.answer_batch(requests, images)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """A bag of 12 frames turned into 24 unanswered questions, and 4 records with a given answer."""
    root = tmp_path_factory.mktemp("unlabelled")
    bag = write_image_bag(root / "run", recording(12))
    bag_to_dataset(bag, root / "ds", FromBagOptions(families=("count", "caption")), progress=False)
    records = json.loads((root / "ds" / "data.json").read_text())
    records[0]["conversations"].append({"from": "gpt", "value": "two"})  # someone labelled this one
    records.append({**records[1], "id": "broken", "image": "images/missing.png"})
    (root / "ds" / "data.json").write_text(json.dumps(records))
    return root / "ds" / "data.json"


def test_local_teacher_labels_in_batches_like_the_engine_and_resumes_after_a_kill(unlabelled, tiny_qwen2vl_dir,
                                                                                 tmp_path):
    from vlsi_model.data.llava import load_image
    from vlsi_model.engine import load_engine

    teacher = CountingTeacher(LocalTeacher(tiny_qwen2vl_dir, max_new_tokens=8))
    out = tmp_path / "labelled.json"

    def killed_after_first_batch(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_file(teacher, unlabelled, out, batch_size=5, progress=False, on_batch=killed_after_first_batch)
    assert teacher.asked == 5 and not out.exists()
    report: LabelReport = label_file(teacher, unlabelled, out, batch_size=5, progress=False)
    assert teacher.asked == 5 + 18  # 24 questions - 1 answered already - 5 kept from the killed run
    assert (report.resumed, report.labelled, report.given, report.bad_images) == (5, 18, 1, {"missing_image": 1})
    records = json.loads(out.read_text())
    assert len(records) == 24 and not list(tmp_path.glob("*.partial*"))
    assert records[0]["label"] == {"source": "given"} and records[0]["conversations"][1]["value"] == "two"
    engine = load_engine(tiny_qwen2vl_dir, backend="torch")
    for record in records[1:]:
        label = record["label"]
        assert label["source"] == "teacher" and label["teacher"] == "model" and 0 < label["mean_token_prob"] <= 1
        image = load_image(out.parent / record["image"])  # paths are rewritten for the output folder
        question = record["conversations"][0]["value"].split("\n", 1)[1]
        assert record["conversations"][1]["value"] == engine.answer(image, question, max_new_tokens=8).text


def test_answers_cut_at_max_new_tokens_are_marked_and_counted(unlabelled, yes_model_dir, tmp_path, capsys):
    """A label the token limit cut short would teach the student half an answer: it is kept,
    marked in its label block, counted, and the CLI says to raise --max-new-tokens."""
    whole = label_file(LocalTeacher(yes_model_dir, max_new_tokens=4), unlabelled, tmp_path / "whole.json",
                       progress=False)
    assert whole.labelled == 23 and whole.truncated_answers == 0  # "yes" and its stop token fit
    out = tmp_path / "cut.json"
    assert main(["label", "--teacher", str(yes_model_dir), "--data", str(unlabelled), "--out", str(out),
                 "--max-new-tokens", "1", "--no-progress"]) == 0  # room for "yes" but not for the stop token
    assert "23 answers hit --max-new-tokens 1" in capsys.readouterr().err
    labels = [r["label"] for r in json.loads(out.read_text()) if r["label"]["source"] == "teacher"]
    assert len(labels) == 23 and all(label["truncated"] for label in labels)
    assert not any("truncated" in r["label"] for r in json.loads((tmp_path / "whole.json").read_text()))


def test_eval_refuses_teacher_answers_as_ground_truth_unless_asked(unlabelled, tiny_qwen2vl_dir, tmp_path, capsys):
    out = tmp_path / "labelled.json"
    assert main(["label", "--teacher", str(tiny_qwen2vl_dir), "--data", str(unlabelled), "--out", str(out),
                 "--max-new-tokens", "8", "--no-progress"]) == 0
    assert "labelled 23 questions" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_qwen2vl_dir), "--data", str(out), "--no-progress"]) == 1
    assert "not ground truth" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_qwen2vl_dir), "--data", str(out), "--no-progress",
                 "--max-new-tokens", "8", "--allow-teacher-labels", "--out", str(tmp_path / "agree.json")]) == 0
    results = json.loads((tmp_path / "agree.json").read_text())
    assert results["references"] == "teacher: model"
    assert results["overall"]["accuracy"] > 0.9  # the teacher agrees with itself (one record was given)


def test_weighted_sources_fill_their_share_and_the_metrics_count_them(unlabelled, tiny_qwen2vl_dir, tmp_path):
    from vlsi_model.training.sft import run_sft

    labelled = tmp_path / "labelled.json"
    label_file(LocalTeacher(tiny_qwen2vl_dir, max_new_tokens=4), unlabelled, labelled, progress=False)
    given = [r for r in json.loads(labelled.read_text()) if r["label"]["source"] == "given"]
    (tmp_path / "given.json").write_text(json.dumps(given * 3))
    (tmp_path / "images").symlink_to(unlabelled.parent / "images")  # given.json's relative image paths
    config = {"model": {"path": str(tiny_qwen2vl_dir)},
              "data": {"train": [{"path": str(tmp_path / "given.json"), "weight": 1.0, "name": "labels"},
                                 {"path": str(labelled), "weight": 3.0, "name": "teacher"}], "max_length": 256},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_batch_size": 4,
                        "warmup_steps": 1, "log_every_steps": 2, "save_every_steps": 0}}
    run_sft(config)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "samples/labels" in m][-1]
    assert last["step"] == 4 and last["samples/labels"] + last["samples/teacher"] == 16
    meta = json.loads((tmp_path / "run" / "final" / "vlsi_model.json").read_text())
    sources = meta["data_sources"]
    assert sources["teacher"]["teacher_labelled"] == 23 and sources["labels"]["teacher_labelled"] == 0
    assert sources["labels"]["share"] == pytest.approx(0.25, abs=0.02)


def test_a_repeated_image_and_question_is_asked_once(unlabelled, tiny_qwen2vl_dir, tmp_path):
    """Mixes draw a caption image several times: the teacher answers it once, every copy gets it."""
    records = json.loads(unlabelled.read_text())[1:5]
    data = unlabelled.parent / "repeated.json"
    data.write_text(json.dumps([{**r, "id": f"{r['id']}_{k}"} for k in range(3) for r in records]))
    teacher = CountingTeacher(LocalTeacher(tiny_qwen2vl_dir, max_new_tokens=8))
    report = label_file(teacher, data, tmp_path / "out.json", progress=False)
    assert teacher.asked == report.asked == 4 and report.labelled == 12
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["conversations"][1]["value"] for r in out[:4]] * 3 == [r["conversations"][1]["value"] for r in out]


def test_two_processes_label_their_shares_and_the_main_one_merges(unlabelled, tiny_qwen2vl_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: each labels half, the output equals one process's."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "vlsi_model.cli", "label", "--teacher", str(tiny_qwen2vl_dir), "--data", str(unlabelled),
           "--out", str(tmp_path / "two.json"), "--max-new-tokens", "8", "--batch-size", "4", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    label_file(LocalTeacher(tiny_qwen2vl_dir, max_new_tokens=8), unlabelled, tmp_path / "one.json", progress=False)
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert not list(tmp_path.glob("*.partial*"))
