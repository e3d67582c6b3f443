"""`vlsi distill` end to end on tiny models: the three steps, the output layout, a final student
that loads and answers, `--steps` subsets, an interrupted interaction step resumed exactly, and
the teacher cache reproducing the online teacher."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from distill_helpers import build_pair
from safetensors.torch import load_file

from vlsi_model.cli import main
from vlsi_model.distill.config import load_distill_config, parse_steps
from vlsi_model.distill.interaction import InteractionObjective
from vlsi_model.training.config import ConfigError
from vlsi_model.training.trainer import drawn_sample_indices

REPO = Path(__file__).resolve().parents[1]
END_TO_END_BUDGET_S = 60.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Teacher and student directories sharing one tokenizer, and a small scenes dataset."""
    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    from vlsi_model.models import make_image_processor, save_model_dir
    root = tmp_path_factory.mktemp("distill")
    student, teacher = build_pair(tiny_tokenizer)
    processor = make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112)
    save_model_dir(student, tiny_tokenizer, processor, root / "student")
    save_model_dir(teacher, tiny_tokenizer, processor, root / "teacher")
    data = write_dataset(root / "data", 8, seed=0, config=SceneConfig(width=56, height=56),
                         families=("caption", "count"))
    return root, data


def _config(root: Path, data: Path, out: Path, **changes) -> dict:
    cfg = {
        "output_dir": str(out),
        "teacher": {"path": str(root / "teacher")},
        "student": {"path": str(root / "student")},
        "data": {"train": str(data), "max_length": 256},
        "verbalizers": {"student": {"layers": [1, 2, 3]}, "teacher": {"stride": 2, "start": 1}, "chunk_tokens": 32},
        "matching": {"variant": "full", "seed": 0},
        "loss": {"chunk_tokens": 32},
        "lora": {"r": 4, "alpha": 4},
        "train": {"max_steps": 3, "per_device_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every_steps": 1,
                  "save_every_steps": 2},
        "steps": {"interact": {"max_steps": 4}},
    }
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    root, data = setup
    out = tmp_path_factory.mktemp("run_a") / "out"
    cfg = _write(out.parent / "distill.yaml", _config(root, data, out))
    t0 = time.perf_counter()
    rc = main(["distill", "--config", str(cfg)])
    return rc, time.perf_counter() - t0, out, cfg


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_three_steps_end_to_end(setup, full_run):
    from vlsi_model.checkpoint import load_model_dir, read_metadata
    from vlsi_model.data.llava import load_image
    from vlsi_model.engine import load_engine

    root, data = setup
    rc, elapsed, out, _ = full_run
    assert rc == 0
    assert elapsed < END_TO_END_BUDGET_S, f"the three steps took {elapsed:.1f} s"
    # Layout: each step's output, verbalizers beside the checkpoints that need them.
    assert (out / "teacher_verbalizers" / "verbalizers.safetensors").is_file()
    assert json.loads((out / "teacher_verbalizers" / "verbalizers.json").read_text())["target_layers"] == [1, 3, 5, 7]
    assert (out / "student_verbalized" / "verbalizers" / "verbalizers.json").is_file()
    assert (out / "interaction" / "verbalizers" / "verbalizers.safetensors").is_file()
    stats = json.loads((out / "interaction" / "matching_stats.json").read_text())
    assert stats["student_layers"] == [1, 2, 3] and stats["teacher_layers"] == [1, 3, 5, 7]
    assert sum(map(sum, stats["overall"]["counts"])) == 4 * 3  # 4 steps x 3 student targets
    assert (out / "interaction" / "matching_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # Step 1 froze the backbone; step 2 changed it (LoRA merged: plain weight names, new values).
    original, verbalized = _weights(root / "student"), _weights(out / "student_verbalized")
    interacted, final = _weights(out / "interaction"), _weights(out / "final")
    assert all(torch.equal(original[k], verbalized[k]) for k in original)
    assert set(interacted) == set(original) == set(final)
    assert not any("lora" in k for k in interacted)
    assert any(not torch.equal(original[k], interacted[k]) for k in original)
    assert any(not torch.equal(interacted[k], final[k]) for k in original)
    # The deployable student: a plain HF directory without any verbalizer weights, loadable and answering.
    assert not (out / "final" / "verbalizers").exists()
    assert not any(p.name.startswith("verbalizers") for p in (out / "final").rglob("*"))
    model, _, _ = load_model_dir(out / "final")
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in original.values())
    assert read_metadata(out / "final")["step"] == "sft"
    engine = load_engine(out / "final", backend="torch")
    try:
        image = load_image(data.parent / "images" / "train_000000.png")
        result = engine.answer(image, "How many shapes are there?", max_new_tokens=4)
    finally:
        engine.close()
    assert isinstance(result.text, str) and 1 <= result.num_tokens <= 4
    for run in ("verbalize_teacher", "verbalize_student", "interact", "sft"):
        assert (out / "runs" / run / "metrics.jsonl").is_file()


class _Interrupted(Exception):
    pass


def test_steps_subsets_and_exact_resume_of_interaction(setup, full_run, tmp_path, monkeypatch, capsys):
    root, data = setup
    _, _, out_a, _ = full_run
    out = tmp_path / "out"
    cfg = _write(tmp_path / "distill.yaml", _config(root, data, out))

    assert main(["distill", "--config", str(cfg), "--steps", "verbalize"]) == 0
    assert (out / "student_verbalized").is_dir() and (out / "teacher_verbalizers").is_dir()
    assert not (out / "interaction").exists() and not (out / "final").exists()
    a_verbs = load_file(str(out_a / "teacher_verbalizers" / "verbalizers.safetensors"))
    b_verbs = load_file(str(out / "teacher_verbalizers" / "verbalizers.safetensors"))
    assert all(torch.equal(a_verbs[k], b_verbs[k]) for k in a_verbs)  # reproducible

    original = InteractionObjective.set_progress

    def interrupt_at_step_2(self, step, max_steps):
        if step == 2:
            raise _Interrupted
        original(self, step, max_steps)

    monkeypatch.setattr(InteractionObjective, "set_progress", interrupt_at_step_2)
    with pytest.raises(_Interrupted):
        main(["distill", "--config", str(cfg), "--steps", "interact"])
    monkeypatch.setattr(InteractionObjective, "set_progress", original)
    assert (out / "runs" / "interact" / "checkpoints" / "step_2").is_dir()
    assert not (out / "interaction").exists()

    assert main(["distill", "--config", str(cfg), "--steps", "interact", "--resume"]) == 0
    a, b = _weights(out_a / "interaction"), _weights(out / "interaction")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed interaction differs from the uninterrupted one"
    a_matches = (out_a / "runs" / "interact" / "matches_rank0.jsonl").read_text()
    assert (out / "runs" / "interact" / "matches_rank0.jsonl").read_text() == a_matches
    assert json.loads((out / "interaction" / "matching_stats.json").read_text()) == json.loads(
        (out_a / "interaction" / "matching_stats.json").read_text()
    )
    # A completed step is not silently redone; --resume skips it.
    capsys.readouterr()
    assert main(["distill", "--config", str(cfg), "--steps", "interact"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["distill", "--config", str(cfg), "--steps", "verbalize,interact", "--resume"]) == 0


def test_step3_with_student_freeze_vision_trains_only_the_language_model(setup, full_run, tmp_path):
    """A student trained on a frozen vision encoder keeps it in step 3 (`student.freeze_vision`)."""
    import shutil

    root, data = setup
    _, _, out_a, _ = full_run
    out = tmp_path / "out"
    shutil.copytree(out_a / "interaction", out / "interaction")
    cfg = _config(root, data, out, lora={"enabled": False})
    cfg["student"]["freeze_vision"] = True
    assert main(["distill", "--config", str(_write(tmp_path / "distill.yaml", cfg)), "--steps", "sft"]) == 0
    before, after = _weights(out / "interaction"), _weights(out / "final")
    vision = [k for k in before if "visual." in k]
    language = [k for k in before if "visual." not in k and "layers." in k]
    assert vision and language
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)


@pytest.mark.parametrize("interact_trains", ["decoder", "language_model"])
def test_interaction_trains_the_decoder_or_the_whole_language_model(setup, full_run, tmp_path, interact_trains):
    """Step 2 without LoRA: the paper's decoder layers only, or (a student from a random init) the
    embeddings, final norm and LM head too; the vision encoder never trains in step 2."""
    import shutil

    root, data = setup
    _, _, out_a, _ = full_run
    out = tmp_path / "out"
    for step_output in ("teacher_verbalizers", "student_verbalized"):
        shutil.copytree(out_a / step_output, out / step_output)
    cfg = _config(root, data, out, lora={"enabled": False})
    cfg["student"]["interact_trains"] = interact_trains
    assert main(["distill", "--config", str(_write(tmp_path / "distill.yaml", cfg)), "--steps", "interact"]) == 0
    before, after = _weights(out / "student_verbalized"), _weights(out / "interaction")
    outer = [k for k in before if k.endswith(("embed_tokens.weight", "language_model.norm.weight", "lm_head.weight"))]
    layers = [k for k in before if "visual." not in k and "layers." in k]
    vision = [k for k in before if "visual." in k]
    assert outer and layers and vision
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not torch.equal(before[k], after[k]) for k in layers if k.endswith("q_proj.weight"))
    changed = [k for k in outer if not torch.equal(before[k], after[k])]
    assert changed == (outer if interact_trains == "language_model" else [])


def test_a_step_without_its_inputs_is_a_clear_error(setup, tmp_path, capsys):
    root, data = setup
    cfg = _write(tmp_path / "distill.yaml", _config(root, data, tmp_path / "out"))
    assert main(["distill", "--config", str(cfg), "--steps", "sft"]) == 2
    assert "run the earlier step(s) first" in capsys.readouterr().err
    assert main(["distill", "--config", str(cfg), "--steps", "interact,bogus"]) == 2


def test_teacher_cache_reproduces_the_online_interaction(setup, full_run, tmp_path, capsys):
    """Built for the samples step 2 draws only, a cache reproduces the online losses; other seeds are refused."""
    root, data = setup
    _, _, out_a, _ = full_run
    out = tmp_path / "out"
    out.mkdir()
    for name in ("teacher_verbalizers", "student_verbalized"):  # reuse step 1's outputs
        shutil.copytree(out_a / name, out / name)
    cfg = _write(tmp_path / "cached.yaml", _config(
        root, data, out, teacher_cache={"enabled": True, "k": 100000, "batch_size": 3},
    ))
    assert main(["distill", "--config", str(cfg), "--steps", "interact"]) == 0
    index = json.loads((out / "teacher_cache" / "index.json").read_text())
    assert index["vocab_size"] == 416 and index["k"] == 416
    # Coverage "run" (the default): exactly the samples the 4 interaction steps of 2 draw, not the dataset.
    dataset_len = len(json.loads(Path(data).read_text()))
    run_cfg = load_distill_config(cfg).train_config("interact", "interact")
    drawn = drawn_sample_indices(run_cfg, dataset_len)
    assert sorted(int(i) for i in index["samples"]) == drawn
    assert len(drawn) == 8 < dataset_len

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "runs" / "interact" / "metrics.jsonl").read_text().splitlines()]

    online, cached = rows(out_a), rows(out)
    assert len(online) == len(cached) == 4
    for r_online, r_cached in zip(online, cached, strict=True):
        for key in ("loss", "loss_intermediate", "loss_last", "match_mean_teacher_layer"):
            assert r_cached[key] == pytest.approx(r_online[key], rel=1e-4, abs=1e-6), key

    # Another seed draws other samples: reusing that cache is a clear error, not a crash mid-run.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("teacher_verbalizers", "student_verbalized"):
        shutil.copytree(out_a / name, other / name)
    other_cfg = _config(root, data, other, teacher_cache={"enabled": True, "k": 100000, "batch_size": 3,
                                                         "path": str(out / "teacher_cache")})
    other_cfg["steps"]["interact"]["seed"] = 1
    capsys.readouterr()
    assert main(["distill", "--config", str(_write(tmp_path / "other.yaml", other_cfg)), "--steps", "interact"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "samples this run draws" in err


def test_configs_parse_and_bad_keys_are_named(setup, tmp_path):
    root, data = setup
    cfg = load_distill_config(REPO / "configs" / "distill_tiny.yaml")
    assert cfg.matching.variant == "full" and cfg.loss.intermediate_op == "kld" and cfg.lora.r == 16
    assert cfg.train_config("sft", "sft").lr == 5e-4 and cfg.train_config("interact", "x").max_steps == 500
    assert parse_steps("sft,verbalize") == ("verbalize", "sft")
    base = _config(root, data, tmp_path / "out")
    for mutate, message in (
        (lambda c: c["loss"].update(intermediate_op="js"), "intermediate_op"),
        (lambda c: c["matching"].update(variant="best"), "matching variant"),
        (lambda c: c["train"].update(output_dir="x"), "output_dir"),
        (lambda c: c["steps"].update(distill={}), "unknown step"),
        (lambda c: c["train"].update(lerning_rate=1), "lerning_rate"),
        (lambda c: c.update(extra=1), "extra"),
        (lambda c: c["teacher"].update(freeze_vision=True), "teacher never trains"),
        (lambda c: c["teacher"].update(interact_trains="language_model"), "teacher never trains"),
        (lambda c: c["student"].update(interact_trains="everything"), "interact_trains: must be one of"),
        (lambda c: (c["student"].update(interact_trains="language_model"), c["lora"].update(enabled=True)),
         "LoRA trains only the decoder"),
        (lambda c: c.update(teacher_cache={"enabled": True, "coverage": "some"}), "teacher_cache.coverage"),
        (lambda c: (c["student"].update(freeze_vision=True), c["lora"].update(steps=["interact", "sft"])),
         "LoRA already trains only the decoder"),
    ):
        bad = json.loads(json.dumps(base))
        mutate(bad)
        with pytest.raises(ConfigError, match=message):
            load_distill_config(bad)


def test_matching_sharpness_reads_a_finished_run(full_run, tmp_path):
    """scripts/study/matching_sharpness.py: how far from uniform a finished run's adaptive matching
    drew, rebuilt from the run's own directory, with the formula training used."""
    from benchmark_scripts import load_script

    sharpness = load_script(REPO / "scripts" / "study" / "matching_sharpness.py")
    # One draw by hand: student target 0 of 2 over 3 teacher targets has candidates 0-1.
    matcher = sharpness.InspectingMatcher(variant="full", seed=0)
    d = torch.tensor([[0.0, 0.5, 9.0], [9.0, 0.2, 0.1]], dtype=torch.float64)
    matches = matcher.match(d, 2, 3)
    first = matcher.draws[0]
    assert first["s"] == 0 and first["spread"] == pytest.approx(0.5) and first["uniform"] == 0.5
    # tau = 2 / 0.5 = 4: p = softmax([0, -0.125])
    assert first["p_max"] == pytest.approx(float(torch.softmax(torch.tensor([0.0, -0.125]), 0)[0]))
    assert len(matcher.draws) == (2 if matches[0] == 0 else 1)  # after teacher 1, target 1 has one candidate left
    _, _, out, _ = full_run
    assert sharpness.main([str(out), "--batches", "2", "--out", str(tmp_path / "sharpness.json")]) == 0
    report = json.loads((tmp_path / "sharpness.json").read_text())
    assert set(report["stages"]) == {"start of step 2", "end of step 2"}
    for stage in report["stages"].values():
        rows = stage["by_student_target"]
        assert rows["0"]["draws"] == 2  # student target 0 always chooses (teacher targets 0-1), once per batch
        for row in rows.values():
            assert row["uniform"] <= row["p_max_mean"] <= 1.0
            assert 0.0 <= row["spread_median"] <= row["spread_max"]
    # --against: the share of steps two runs drew the same matches, from their step-2 records.
    def records(run, rows):
        (run / "runs" / "interact").mkdir(parents=True)
        lines = [json.dumps({"step": step, "s": s, "t": t}) for step, ts in enumerate(rows) for s, t in enumerate(ts)]
        (run / "runs" / "interact" / "matches_rank0.jsonl").write_text("\n".join(lines) + "\n")
        return run
    a = records(tmp_path / "a", [(0, 2), (1, 2), (0, 1), (0, 2)])
    b = records(tmp_path / "b", [(0, 2), (1, 2), (0, 2)])  # step 2 differs, step 3 not recorded
    assert sharpness.same_matches(a, b) == {"against": str(b), "steps": 3, "same_share": 2 / 3}
    assert sharpness.same_matches(out, out)["same_share"] == 1.0
