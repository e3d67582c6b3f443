"""The nano family: configs build at the intended sizes and share the family tokenizer's ids."""

from __future__ import annotations

import numpy as np
import pytest

from vlsi_model.nano import (
    STUDENT_PARAM_RANGE,
    TEACHER_PARAM_RANGE,
    nano_image_processor,
    nano_student_config,
    nano_teacher_config,
    nano_tokenizer,
    save_nano_tokenizer,
)
from vlsi_model.tokenizer import SPECIAL_TOKEN_IDS


@pytest.fixture(scope="module")
def tokenizer():
    return nano_tokenizer(num_scenes=100)  # smaller corpus than the shipped one: same specials, faster


def _params(config) -> int:
    from vlsi_model.models import build_model

    return sum(p.numel() for p in build_model(config).parameters())


def test_tokenizer_has_qwen2vl_specials_first(tokenizer):
    for token, expected in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == expected
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Scene words are whole tokens (merges learned), not byte soup.
    assert len(tokenizer.encode("What color is the circle?", add_special_tokens=False)) <= 8


def test_tokenizer_round_trips_through_hf_layout(tmp_path):
    from vlsi_model.checkpoint import load_tokenizer

    out = save_nano_tokenizer(tmp_path / "tok", num_scenes=50)
    assert (out / "tokenizer.json").is_file()
    loaded = load_tokenizer(out)
    assert loaded.encode("red circle blue square") == nano_tokenizer(num_scenes=50).encode("red circle blue square")


def test_student_and_teacher_sizes(tokenizer):
    s_cfg, t_cfg = nano_student_config(tokenizer), nano_teacher_config(tokenizer)
    student, teacher = _params(s_cfg), _params(t_cfg)
    assert STUDENT_PARAM_RANGE[0] <= student <= STUDENT_PARAM_RANGE[1]
    assert TEACHER_PARAM_RANGE[0] <= teacher <= TEACHER_PARAM_RANGE[1]
    st, tt = s_cfg.get_text_config(), t_cfg.get_text_config()
    assert tt.hidden_size > st.hidden_size and tt.num_hidden_layers > st.num_hidden_layers  # deeper and wider
    assert t_cfg.vision_config.depth > s_cfg.vision_config.depth
    # VLsI needs one vocabulary and identical special ids on both sides.
    assert st.vocab_size == tt.vocab_size == len(tokenizer)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(s_cfg, key) == getattr(t_cfg, key) == SPECIAL_TOKEN_IDS[
            {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}[key]]


def test_images_are_16_merged_tokens(tokenizer):
    from vlsi_model.prompting import build_inputs

    processor = nano_image_processor()
    sample = build_inputs(tokenizer, processor, np.zeros((112, 112, 3), np.uint8), "What objects are there?")
    image_id = SPECIAL_TOKEN_IDS["<|image_pad|>"]
    assert int((sample["input_ids"] == image_id).sum()) == 16
    assert sample["input_ids"].shape[1] < 48  # ~40-token samples, as NANO_NOTES measured


def test_student_config_matches_the_recipe_yaml(tokenizer):
    """configs/nano/student.yaml spells out the same architecture as NANO_STUDENT_ARCH."""
    from pathlib import Path

    import yaml

    from vlsi_model.nano import NANO_STUDENT_ARCH, NANO_TEACHER_ARCH

    root = Path(__file__).resolve().parents[1] / "configs" / "nano"
    student = yaml.safe_load((root / "student.yaml").read_text())
    assert student["model"]["from_config"]["architecture"] == NANO_STUDENT_ARCH
    teacher = yaml.safe_load((root / "teacher.yaml").read_text())
    assert teacher["model"]["from_config"]["architecture"] == NANO_TEACHER_ARCH


def test_qwen3_student_config_builds_the_nano_text_model_with_32_px_tokens(tokenizer):
    """configs/nano/qwen3_student.yaml (issue 22): a Qwen3-VL with the Qwen2-VL nano student's text
    model, whose 128x128 frames give the same 16 image tokens (one object per 32-px cell)."""
    from pathlib import Path

    import yaml

    from vlsi_model.nano import NANO_STUDENT_ARCH
    from vlsi_model.training.sft import FromConfigSection, _factory

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/nano/qwen3_student.yaml").read_text())
    section = FromConfigSection(**{**config["model"]["from_config"], "tokenizer": "unused"})
    arch = section.architecture
    assert section.family == "qwen3_vl" and section.max_pixels == 128 * 128
    assert {k: arch[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")} == \
        {k: NANO_STUDENT_ARCH[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                           "intermediate_size")}
    cfg = _factory("qwen3_vl")(tokenizer=tokenizer, **arch)
    tokens = (128 // cfg.vision_config.patch_size // cfg.vision_config.spatial_merge_size) ** 2
    assert tokens == 16


def test_the_qwen3_stages_are_the_qwen2_recipe_on_their_own_runs():
    """`FAMILY=qwen3 scripts/train_default_student.sh` trains configs/nano/qwen3_student*.yaml: each later
    stage has the Qwen2-VL stage's settings (steps, lr, schedule, batch, freezing) and starts from the
    previous Qwen3-VL stage's final model, all inside runs/nano_qwen3 (no Qwen2-VL model or data)."""
    from pathlib import Path

    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs" / "nano"
    previous = yaml.safe_load((configs / "qwen3_student.yaml").read_text())["train"]["output_dir"]
    for stage in ("grids", "locate", "locate_more"):
        qwen2 = yaml.safe_load((configs / f"student_{stage}.yaml").read_text())
        qwen3 = yaml.safe_load((configs / f"qwen3_student_{stage}.yaml").read_text())
        assert qwen3["model"]["path"] == f"{previous}/final", stage
        assert {k: v for k, v in qwen3["train"].items() if k != "output_dir"} == \
            {k: v for k, v in qwen2["train"].items() if k != "output_dir"}, stage
        assert qwen3["nano"] == qwen2["nano"]
        assert qwen3["data"]["train"] == qwen2["data"]["train"].replace("runs/nano/", "runs/nano_qwen3/")
        assert all(str(v).startswith("runs/nano_qwen3/")
                   for v in (qwen3["data"]["train"], qwen3["train"]["output_dir"]))
        previous = qwen3["train"]["output_dir"]
    script = (configs.parents[1] / "scripts" / "train_default_student.sh").read_text()
    assert "qwen3) PREFIX=configs/nano/qwen3_student DEFAULT_RUNS=runs/nano_qwen3" in script


def test_grown_teacher_of_the_reproduction_script_is_the_family_teacher_size(tokenizer):
    """scripts/train_default_student.sh grows the student to NANO_TEACHER_ARCH's language model, into the
    directory configs/nano/teacher_grown.yaml trains from; the result is in the teacher's parameter range."""
    import re
    from pathlib import Path

    from vlsi_model.growth import GrowthPlan, grow_language_model
    from vlsi_model.models import build_model
    from vlsi_model.nano import NANO_TEACHER_ARCH
    from vlsi_model.recipes.nano import load_nano_config

    repo = Path(__file__).resolve().parents[1]
    script = (repo / "scripts" / "train_default_student.sh").read_text()
    grow = re.search(r"recipes\.nano grow (.*?--intermediate-size \d+)", script, re.S).group(1)
    sizes = {flag.replace("-", "_"): int(value) for flag, value in re.findall(r"--([a-z-]+) (\d+)", grow)}
    assert sizes == {"num_layers": 8, **{k: NANO_TEACHER_ARCH[k] for k in
                                         ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size")}}
    assert NANO_TEACHER_ARCH["num_layers"] == sizes["num_layers"]
    assert '--out "$TEACHER/init"' in grow
    assert str(load_nano_config(repo / "configs" / "nano" / "teacher_grown.yaml").model.path) == \
        "runs/nano/teacher_grown/init"
    grown = grow_language_model(build_model(nano_student_config(tokenizer)), GrowthPlan(**sizes))
    assert TEACHER_PARAM_RANGE[0] <= sum(p.numel() for p in grown.parameters()) <= TEACHER_PARAM_RANGE[1]


def test_write_mix_reaches_the_caption_share(tmp_path):
    import json

    from vlsi_model.data.scene_dataset import write_dataset
    from vlsi_model.data.scenes import SceneConfig
    from vlsi_model.recipes.nano import write_mix
    cfg = SceneConfig(width=56, height=56, max_objects=3)
    vqa = write_dataset(tmp_path / "vqa", 6, seed=0, config=cfg, families=("count", "exist"))
    cap = write_dataset(tmp_path / "cap", 3, seed=1, config=cfg, families=("caption",))
    mix = write_mix(tmp_path / "mix" / "train.json", vqa, cap, caption_share=0.5)
    records = json.loads(mix.read_text())
    n_vqa = len(json.loads(vqa.read_text()))
    assert sum(r["family"] == "caption" for r in records) == n_vqa  # 50%: as many captions as VQA records
    assert all((mix.parent / r["image"]).is_file() for r in records)  # paths rebased to the mix's folder
    assert write_mix(tmp_path / "mix" / "again.json", vqa, cap, 0.5).read_text() == mix.read_text()  # seeded


def test_prepare_data_dense_share_can_also_name_sizes(tmp_path):
    import json

    from vlsi_model.recipes.nano import prepare_data

    default = prepare_data(tmp_path, 4, 3, layout="grid", families=("count",))
    sized = prepare_data(tmp_path, 4, 3, layout="grid", families=("count",), dense_families=("caption", "describe"),
                         mix_file="sized.json")
    plain, both = json.loads(default.read_text()), json.loads(sized.read_text())
    assert {r["family"] for r in plain} == {"count", "caption"}
    assert {r["family"] for r in both} == {"count", "caption", "describe"}
    assert len(both) == len(plain)  # the dense share is the same; only what the dense records say differs
    describe = [r for r in both if r["family"] == "describe"]
    assert all(any(size in r["conversations"][1]["value"] for size in ("small", "large")) for r in describe)
    assert [r for r in both if r["family"] == "count"] == [r for r in plain if r["family"] == "count"]
    assert all((sized.parent / r["image"]).is_file() for r in both)
    # Other question families in the same folder: a set of their own, never the count-only one reused.
    where = prepare_data(tmp_path, 4, 3, layout="grid", families=("count", "locate"), mix_file="where.json")
    assert {r["family"] for r in json.loads(where.read_text())} == {"count", "locate", "caption"}


def test_blend_mixes_takes_as_many_records_of_each_frame_geometry(tmp_path):
    import json

    from PIL import Image

    from vlsi_model.recipes.nano import blend_mixes, prepare_data

    square = prepare_data(tmp_path / "4x4", 3, 4, families=("count",))
    camera = prepare_data(tmp_path / "4x3", 2, 2, families=("count",), size=(160, 120), grid=(4, 3))
    first = json.loads(camera.read_text())[0]
    assert Image.open(camera.parent / first["image"]).size == (160, 120)
    out = blend_mixes(tmp_path / "both" / "train.json", [square, camera], seed=1)
    both = json.loads(out.read_text())
    sizes = [Image.open(out.parent / r["image"]).size for r in both]
    n = len(json.loads(camera.read_text()))
    assert len(json.loads(square.read_text())) > n  # the larger mix is the one subsampled
    assert sizes.count((112, 112)) == sizes.count((160, 120)) == n
    assert blend_mixes(tmp_path / "both" / "again.json", [square, camera], seed=1).read_text() == out.read_text()
    with pytest.raises(ValueError, match="at least two"):
        blend_mixes(tmp_path / "x.json", [square])


def test_freeze_vision_tower_keeps_the_merger_trainable(tokenizer):
    from vlsi_model.models import build_model, freeze_vision

    model = build_model(nano_student_config(tokenizer))
    frozen = freeze_vision(model, include_merger=False)
    visual = model.model.visual
    assert frozen == sum(p.numel() for n, p in visual.named_parameters() if not n.startswith("merger."))
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert not any(p.requires_grad for p in visual.blocks.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_freeze_vision_tower_with_merger_leaves_only_the_language_model(tokenizer):
    from vlsi_model.models import build_model, freeze_vision

    model = build_model(nano_student_config(tokenizer))
    frozen = freeze_vision(model)
    assert frozen == sum(p.numel() for p in model.model.visual.parameters())
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert all(p.requires_grad for p in model.lm_head.parameters())


def test_rope_theta_is_an_architecture_knob(tokenizer):
    """`architecture: {rope_theta: ...}` reaches the text config (and changes the rotary frequencies)."""
    from vlsi_model.models import tiny_qwen2vl_config, tiny_qwen25vl_config

    for factory in (tiny_qwen2vl_config, tiny_qwen25vl_config):
        assert factory(tokenizer=tokenizer).get_text_config().rope_parameters["rope_theta"] == 1_000_000.0
        assert factory(tokenizer=tokenizer, rope_theta=10.0).get_text_config().rope_parameters["rope_theta"] == 10.0
