"""Model directories: configs wired to the tokenizer, atomic saving, safe and strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlsi_model.checkpoint import load_model_dir, read_metadata
from vlsi_model.engine.base import ModelLoadError
from vlsi_model.models import (
    TokenIds,
    build_model,
    make_image_processor,
    save_model_dir,
    tiny_qwen2vl_config,
    tiny_qwen25vl_config,
)
from vlsi_model.tokenizer import SPECIAL_TOKEN_IDS

HF_FILES = {
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "preprocessor_config.json",
}


@pytest.fixture
def model_copy(tiny_qwen2vl_dir, tmp_path) -> Path:
    """A private copy of the tiny Qwen2-VL directory that a test may break."""
    return Path(shutil.copytree(tiny_qwen2vl_dir, tmp_path / "m"))


# ------------------------------------------------------------------------ configs / building
@pytest.mark.parametrize("factory", [tiny_qwen2vl_config, tiny_qwen25vl_config])
def test_config_ids_match_tokenizer(tiny_tokenizer, factory):
    cfg = factory(tokenizer=tiny_tokenizer)
    assert cfg.image_token_id == tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tiny_tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tiny_tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tiny_tokenizer.convert_tokens_to_ids("<|vision_end|>")
    text = cfg.get_text_config()
    assert text.vocab_size == len(tiny_tokenizer)
    assert text.eos_token_id == tiny_tokenizer.eos_token_id
    assert text.pad_token_id == tiny_tokenizer.pad_token_id
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert cfg.vision_config.spatial_merge_size == 2 and cfg.vision_config.patch_size == 14
    # Without a tokenizer the ids of train_bpe_tokenizer's layout are used.
    assert factory(vocab_size=300).image_token_id == SPECIAL_TOKEN_IDS["<|image_pad|>"]
    assert TokenIds.from_tokenizer(tiny_tokenizer) == TokenIds.default()


def test_config_rejects_inconsistent_sizes(tiny_tokenizer):
    with pytest.raises(ValueError, match="smaller than"):
        tiny_qwen2vl_config(vocab_size=100, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_qwen2vl_config(vocab_size=10)
    with pytest.raises(ValueError, match="divide"):
        tiny_qwen2vl_config(vocab_size=300, hidden_size=60, num_heads=8)


def test_build_model_is_deterministic_and_keeps_global_rng(tiny_tokenizer):
    cfg = tiny_qwen2vl_config(tokenizer=tiny_tokenizer, hidden_size=32, num_layers=1, vision_depth=1,
                              vision_embed_dim=32)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(cfg, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_model(cfg, seed=5)
    c = build_model(cfg, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_image_processor_settings():
    proc = make_image_processor(min_pixels=28 * 28, max_pixels=224 * 224)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (784, 224 * 224)
    with pytest.raises(ValueError):
        make_image_processor(min_pixels=10)


# ------------------------------------------------------------------------ saving
def test_saved_directory_is_complete(tiny_qwen2vl_dir, tiny_qwen25vl_dir):
    for d in (tiny_qwen2vl_dir, tiny_qwen25vl_dir):
        names = {p.name for p in d.iterdir()}
        assert names >= HF_FILES
        assert not any(n.endswith(".bin") for n in names)
        assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]]
        assert read_metadata(d) == {"placeholder": False, "test": True}


def test_save_refuses_existing_dir_unless_overwrite(tiny_tokenizer, tmp_path):
    cfg = tiny_qwen2vl_config(tokenizer=tiny_tokenizer, hidden_size=32, num_layers=1, vision_depth=1,
                              vision_embed_dim=32)
    proc = make_image_processor()
    out = save_model_dir(build_model(cfg, 0), tiny_tokenizer, proc, tmp_path / "m")
    with pytest.raises(FileExistsError):
        save_model_dir(build_model(cfg, 1), tiny_tokenizer, proc, out)
    save_model_dir(build_model(cfg, 1), tiny_tokenizer, proc, out, overwrite=True)
    reloaded = load_model_dir(out)[0]
    expected = build_model(cfg, 1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ------------------------------------------------------------------------ loading
@pytest.mark.parametrize(
    ("fixture", "cls", "seed", "factory"),
    [
        ("tiny_qwen2vl_dir", Qwen2VLForConditionalGeneration, 1, tiny_qwen2vl_config),
        ("tiny_qwen25vl_dir", Qwen2_5_VLForConditionalGeneration, 2, tiny_qwen25vl_config),
    ],
)
def test_load_both_families_exactly(request, tiny_tokenizer, fixture, cls, seed, factory):
    model, tok, proc = load_model_dir(request.getfixturevalue(fixture))
    assert type(model) is cls and not model.training
    assert isinstance(proc, Qwen2VLImageProcessorPil) and proc.size["longest_edge"] == 112 * 112
    assert tok.get_vocab() == tiny_tokenizer.get_vocab() and tok.chat_template
    expected = build_model(factory(tokenizer=tiny_tokenizer), seed=seed).state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_load_with_dtype(tiny_qwen2vl_dir):
    model = load_model_dir(tiny_qwen2vl_dir, dtype="bf16")[0]
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_dir(tiny_qwen2vl_dir, dtype="int3")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model_dir(tmp_path / "file")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("config.json", "missing config.json"),
        ("model.safetensors", "missing weights"),
        ("tokenizer.json", "missing tokenizer"),
        ("preprocessor_config.json", "missing preprocessor_config.json"),
    ],
)
def test_missing_files(model_copy, name, message):
    (model_copy / name).unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_model_dir(model_copy)


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "tokenizer_config.json"])
def test_corrupt_json(model_copy, name):
    (model_copy / name).write_text('{"model_type": "qwen2_vl", ')
    with pytest.raises(ModelLoadError, match=f"{name}: corrupt JSON"):
        load_model_dir(model_copy)


def test_unsupported_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "llava"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llava'.*qwen2_5_vl, qwen2_vl"):
        load_model_dir(model_copy)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model_dir(model_copy)


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model_dir(model_copy)


def test_pickle_only_weights_are_refused(model_copy):
    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickle.*pytorch_model\.bin.*[Cc]onvert .*safetensors"):
        load_model_dir(model_copy)


def test_weights_missing_tensors_are_refused(model_copy):
    state = load_file(str(model_copy / "model.safetensors"))
    dropped = sorted(k for k in state if "layers.1." in k)
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, str(model_copy / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        load_model_dir(model_copy)


def test_sharded_index_with_missing_shard(model_copy):
    (model_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing weight shard model-00001-of-00002"):
        load_model_dir(model_copy)


def test_tokenizer_that_does_not_match_the_model(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["image_token_id"] = cfg["image_token_id"] + 1
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="tokenizer does not match"):
        load_model_dir(model_copy)


def test_missing_chat_template_falls_back_to_qwen2vl(model_copy):
    (model_copy / "chat_template.jinja").unlink()
    tok = load_model_dir(model_copy)[1]
    assert "<|im_start|>assistant" in tok.chat_template
