"""The shared tokenizer of the tiny test models, and its per-family variants.

Every tiny model (:mod:`betakd.testing.tiny_models`) uses one byte-level BPE tokenizer
trained on the spot by :func:`train_tokenizer` (same vocabulary, same special tokens,
a ChatML-style chat template), so any two models built from it can be teacher and
student. This module holds that vocabulary's special tokens, the default training text
(``DEFAULT_TEXTS``), the chat template, and the per-family copies the model builders
use: :func:`family_tokenizer` (the family's image markup in the template) and
:func:`named_tokens_tokenizer` (Gemma 3 and InternVL append their own image tokens,
``FAMILY_TOKENS``, so they pair within their family).
"""

from __future__ import annotations

import copy
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_TOKEN = "<|video_pad|>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
# Idefics3's processor looks these up even with image splitting off; having them
# in the vocabulary keeps its `add_special_tokens` call from growing the vocabulary.
ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

SPECIAL_TOKENS = (
    PAD_TOKEN,
    TURN_START,
    TURN_END,
    IMAGE_TOKEN,
    VISION_START,
    VISION_END,
    VIDEO_TOKEN,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    END_OF_UTTERANCE,
    *ROW_COL_TOKENS,
)

DEFAULT_TEXTS = (
    "What colour is the shape? The shape is red.",
    "Is there a blue circle in the image? Yes, there is a blue circle.",
    "What shape is in the picture? A green triangle on a white background.",
    "Describe the image in one sentence. A small yellow rectangle near the top left corner.",
    "Answer the question using a single word or phrase. no yes one two three four",
    "Answer with the option's letter from the given choices directly. A B C D",
    "The quick brown fox jumps over the lazy dog 0123456789 .,;:!?()[]{}'\"-+*/=<>",
)

# Markup that stands for one image inside a rendered prompt; each family's
# processor expands it into that model's image tokens.
_IMAGE_MARKUP = {
    "llava": IMAGE_TOKEN,
    "llava_next": IMAGE_TOKEN,
    "llava_onevision": IMAGE_TOKEN,
    "gemma3": "<start_of_image>",
    "internvl": "<IMG_CONTEXT>",
    "qwen2_vl": VISION_START + IMAGE_TOKEN + VISION_END,
    "qwen2_5_vl": VISION_START + IMAGE_TOKEN + VISION_END,
    "idefics3": IMAGE_TOKEN,
    "llama": "",
}


def chat_template(image_markup: str = IMAGE_TOKEN) -> str:
    """ChatML-style template; `content` may be a string or a list of typed parts."""
    return (
        "{%- for message in messages -%}"
        "{{ '" + TURN_START + "' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image_markup + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '" + TURN_END + "\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + TURN_START + "assistant\\n' }}{%- endif -%}"
    )


def train_tokenizer(
    texts: list[str] | tuple[str, ...] = DEFAULT_TEXTS, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with chat and image special tokens.

    Byte-level means any text encodes (no unknown tokens), so a small corpus is
    enough. `vocab_size` must leave room for the 256 bytes and the specials; a
    corpus with too few distinct merges yields fewer tokens than asked for (the
    default corpus fills 512). Deterministic for a given corpus.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is below the byte alphabet + specials ({minimum})"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=TURN_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, TURN_END)],
    )
    tokenizer.chat_template = chat_template(IMAGE_TOKEN)
    return tokenizer


def family_tokenizer(tokenizer: PreTrainedTokenizerFast, family: str) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose chat template renders an image as `family`'s markup."""
    # A copy, so that the caller's tokenizer keeps its generic template.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template(_IMAGE_MARKUP[family])
    return tok


# Gemma 3's processor finds its image markers as named special tokens of the tokenizer.
GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


# InternVL's: "<img>" + "<IMG_CONTEXT>" x n + "</img>" per tile (its video token exists in
# the shared vocabulary).
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
# Image tokens that a family's tokenizer adds to the shared vocabulary.
FAMILY_TOKENS = {"gemma3": GEMMA3_TOKENS, "internvl": INTERNVL_TOKENS}


def named_tokens_tokenizer(
    tokenizer: PreTrainedTokenizerFast, family: str, named: dict[str, str]
) -> PreTrainedTokenizerFast:
    """The shared tokenizer plus a family's image tokens (ids after the shared ones),
    named so that e.g. ``tokenizer.boi_token_id`` exists, as in the family's own
    tokenizer (its processor reads them by name)."""
    tok = family_tokenizer(tokenizer, family)
    tok.add_special_tokens({"additional_special_tokens": list(named.values())})
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        return PreTrainedTokenizerFast.from_pretrained(folder, extra_special_tokens=named)
