# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Tiny Hub-free processors matching the tiny targets of [`specvlm_hf.testing.tiny_models`].

The tokenizer is a word-level vocabulary laid out exactly like the tiny models' token ids (see
[`reserved_token_ids`]): pad / bos / eos at 0 / 1 / 2, one plain word per ordinary text id, chat-role markers in the
reserved slots and the image placeholder at `vocab_size - 1`. Text is split on whitespace and punctuation, so any
sentence made of [`tiny_words`] round-trips exactly; other words map to `<unk>`.

Chat template (every message ends with a marker; assistant turns end with the eos token so that generation stops
there)::

    <s><|user|> <image> question <|end|> <|assistant|> answer </s> <|user|> ... <|end|> <|assistant|>

System messages are rendered like user messages.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .tiny_models import reserved_token_ids

__all__ = ["TINY_CHAT_TEMPLATE", "build_tiny_processor", "build_tiny_tokenizer", "tiny_words"]

# Llava tiny tower: 24 x 24 images, 8 x 8 patches -> 3 x 3 = 9 image tokens (the CLIP CLS token is dropped).
_LLAVA_IMAGE_SIZE, _LLAVA_PATCH_SIZE = 24, 8

_ROLE_MARKERS = ("<|user|>", "<|assistant|>", "<|end|>", "<unk>")  # ids V-8 ... V-5 (the reserved slots)

_BASE_WORDS = (
    "the a an is are was of in on at to and or with what which who where how many color image photo picture "
    "shows show there this that it red green blue yellow black white big small cat dog car tree house sky sun "
    "man woman person left right top bottom one two three four five yes no describe answer question detail please "
    "animal sitting standing near far next behind front water grass road table chair . , ? ! : ;"
).split()

TINY_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|> ' }}{%- else -%}{{ '<|user|> ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image> ' }}{%- elif item['type'] == 'text' -%}{{ item['text'] + ' ' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ ' </s> ' }}{%- else -%}{{ ' <|end|> ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)


def tiny_words(vocab_size: int = 96) -> list[str]:
    """
    The plain words of the tiny vocabulary, in id order (word `i` has id `reserved_token_ids(vocab_size)["first_text"]
    + i`).

    Args:
        vocab_size (`int`, *optional*, defaults to 96):
            Vocabulary size of the tiny target.

    Returns:
        `list[str]`: one word per ordinary text id.
    """
    ids = reserved_token_ids(vocab_size)
    count = ids["last_text"] - ids["first_text"] + 1
    words = list(_BASE_WORDS[:count])
    words += [f"w{i}" for i in range(len(words), count)]
    return words


def build_tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """
    Word-level tokenizer whose ids match the tiny targets of the same `vocab_size`, with [`TINY_CHAT_TEMPLATE`].

    Args:
        vocab_size (`int`, *optional*, defaults to 96):
            Vocabulary size of the tiny target.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`] with `len(tokenizer) == vocab_size`.
    """
    ids = reserved_token_ids(vocab_size)
    vocab = {"<pad>": ids["pad"], "<s>": ids["bos"], "</s>": ids["eos"]}
    vocab.update({word: ids["first_text"] + i for i, word in enumerate(tiny_words(vocab_size))})
    vocab.update({marker: ids["last_text"] + 1 + i for i, marker in enumerate(_ROLE_MARKERS)})
    vocab.update({"<|vision_start|>": ids["image_start"], "<|vision_end|>": ids["image_end"], "<video>": ids["video"]})
    vocab["<image>"] = ids["image"]
    if sorted(vocab.values()) != list(range(vocab_size)):  # pragma: no cover - guards the layout above
        raise AssertionError("tiny vocabulary does not cover every id exactly once")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|user|>", "<|assistant|>", "<|end|>", "<|vision_start|>", "<|vision_end|>", "<video>", "<image>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor(family: str = "llava", vocab_size: int = 96) -> LlavaProcessor:
    """
    Processor for a tiny target from [`build_tiny_target`] (only `"llava"` is available).

    The `LlavaProcessor` resizes and crops images to 24 x 24 pixels with `CLIPImageProcessorPil` (no torchvision) and
    expands each `<image>` into the 9 placeholder tokens the tiny Llava tower produces.

    Args:
        family (`str`, *optional*, defaults to `"llava"`):
            Target family.
        vocab_size (`int`, *optional*, defaults to 96):
            Vocabulary size of the tiny target.

    Returns:
        [`~transformers.LlavaProcessor`] with [`TINY_CHAT_TEMPLATE`].
    """
    if family != "llava":
        raise ValueError(f"no tiny processor for family {family!r}; only 'llava' is available")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE}, crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(vocab_size),
        patch_size=_LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
