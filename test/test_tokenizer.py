"""BPE tokenizer with Qwen2-VL specials: ids, chat format, byte-level round trip, offline save/load."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vlsi_model.tokenizer import QWEN2VL_CHAT_TEMPLATE, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, train_bpe_tokenizer

TEXTS = [
    "What colour is the circle?", "red", "How many blue objects are there?", "three",
    "Is there a green square?", "yes", "Is the star left of the triangle?", "no",
] * 10


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=400)


def test_specials_have_fixed_ids_and_roles(tok):
    for token, tid in SPECIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid
        assert tok.convert_ids_to_tokens(tid) == token
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == SPECIAL_TOKEN_IDS["<|im_end|>"]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == SPECIAL_TOKEN_IDS["<|endoftext|>"]
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens) | {"<|im_start|>"}
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400


def test_specials_are_single_tokens_and_skipped_on_decode(tok):
    for token in SPECIAL_TOKENS:
        ids = tok.encode(f"a{token}b", add_special_tokens=False)
        assert SPECIAL_TOKEN_IDS[token] in ids
        assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template_matches_qwen2vl_user_turn_with_image(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_full_conversation_and_system(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_role_names_are_merged(tok):
    assert len(tok.encode("user", add_special_tokens=False)) == 1
    assert len(tok.encode("assistant", add_special_tokens=False)) == 1


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_round_trip_any_text(tok, text):
    # Unknown characters fall back to bytes: every string survives encode/decode.
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_training_is_deterministic():
    a = train_bpe_tokenizer(TEXTS, vocab_size=330)
    b = train_bpe_tokenizer(TEXTS, vocab_size=330)
    assert a.get_vocab() == b.get_vocab()
    assert a.encode("How many blue objects?") == b.encode("How many blue objects?")


def test_vocab_size_too_small_is_refused():
    with pytest.raises(ValueError, match="at least"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)


def test_save_and_load_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == QWEN2VL_CHAT_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token) == (tok.eos_token, tok.pad_token)
    sample = "Is there a purple star? ünïcode 😀"
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.padding_side == "right"
