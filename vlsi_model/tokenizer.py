"""Small byte-level BPE tokenizers with Qwen2-VL's special tokens and chat format.

Real Qwen2-VL checkpoints ship a 151k-token vocabulary; the project's own small students
(and the test models) need a vocabulary of a few hundred tokens trained on their own
corpus, built offline (no model hub). The `tokenizers` library trains it; the result is
wrapped in a `PreTrainedTokenizerFast` so the rest of the code (prompting, checkpoints,
training) treats it exactly like a real Qwen2-VL tokenizer: same special-token strings,
same chat layout, `save_pretrained` / `from_pretrained` round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2-VL's special tokens in Qwen2-VL's own order (ids 151643..151656 there). Trained
# tokenizers put them first, so here they get ids 0..13 (see `SPECIAL_TOKEN_IDS`).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# Qwen2-VL-Instruct's chat template with one deliberate difference: Qwen's template injects
# "You are a helpful assistant." as a system turn when the conversation has none. Small
# students are trained without it (it would be ~10 more tokens in every ~40-token sample),
# so here a system turn is rendered only when the conversation has one. Everything else
# (turn markers, vision placeholders, generation prompt) is byte-identical, so
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n
# <|im_start|>assistant\n" is what a user turn with an image becomes.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the chat template itself writes; trained into the vocabulary so a role name is one
# token instead of one token per byte.
_TEMPLATE_WORDS = ("user", "assistant", "system", "user\n", "assistant\n", "system\n")


def _with_template_words(texts: Iterable[str]) -> Iterator[str]:
    yield from texts
    for _ in range(50):
        yield from _TEMPLATE_WORDS


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`, offline, with Qwen2-VL's specials and chat template.

    Byte-level means every string can be encoded (unknown characters fall back to their UTF-8
    bytes), so a user question never hits an unknown token. The vocabulary is at most
    `vocab_size`: 256 byte symbols + 14 special tokens + learned merges (training stops early
    when the corpus has no more pairs to merge). Deterministic for the same texts in the same
    order.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_with_template_words(texts), trainer)
    for tok, expected in SPECIAL_TOKEN_IDS.items():
        if backend.token_to_id(tok) != expected:  # the trainer guarantees this order; check, don't assume
            raise RuntimeError(f"special token {tok} got id {backend.token_to_id(tok)}, expected {expected}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Same split as Qwen2-VL's tokenizer_config: every other special is "additional".
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=32768,
    )
