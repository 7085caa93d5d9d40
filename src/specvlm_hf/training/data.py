# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""LLaVA-format conversation data for online distillation.

A record looks like::

    {"images": ["coco/1.jpg", ...],            # or "image": "coco/1.jpg"; paths, PIL images or {"bytes"/"path"} dicts
     "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Each `<image>` placeholder takes the next image; a record with images but no placeholder gets all of them at the start
of its first user turn (LLaVA's convention). Records are rendered with the processor's own chat template in the
standard multimodal message format, and labels keep only assistant tokens. Records that cannot be used are **skipped
and counted by reason** ([`SKIP_REASONS`]); a bad record never stops a run.
"""

from __future__ import annotations

import bisect
import codecs
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from tqdm.auto import tqdm
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from ..errors import UserFileNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = [
    "SKIP_REASONS",
    "FAILED_RECORDS_KEY",
    "BadRecord",
    "DistillationCollator",
    "DistillationDataset",
    "LlavaConversation",
    "encode_conversation",
    "encode_prompt",
    "load_image",
    "load_llava_records",
    "parse_llava_record",
    "to_model_inputs",
    "tokenizer_of",
]

#: Why a record can be skipped, in the order the checks run.
SKIP_REASONS: tuple[str, ...] = (
    "malformed",  # not a record, unknown role, placeholder/image count mismatch, unparseable JSON line, ...
    "no_assistant_turn",  # nothing to learn from: no (non-empty) assistant turn
    "missing_image",  # an image path that does not exist
    "unreadable_image",  # an image that PIL cannot decode
    "template_error",  # the chat template does not render turn by turn as a prefix of the whole conversation
    "processor_error",  # the processor raised on this record
    "too_long",  # more than `max_length` tokens, image tokens included
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
#: Keys holding one value per token and their padding values (`None`: the tokenizer's pad id).
_PER_TOKEN_PAD = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}
#: Unparseable lines (and records failing after validation) logged one by one before only their count is reported.
_LOGGED_BAD_LINES = 3
_WHITESPACE = b" \t\r\n"
#: Key of an item (and of a batch) listing records that failed after validation in a data-loader worker process, so the
#: main process can count them (see `DistillationDataset.record_failures`).
FAILED_RECORDS_KEY = "failed_records"


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of [`SKIP_REASONS`], `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:  # pragma: no cover - programming error
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class LlavaConversation:
    """
    A parsed LLaVA record.

    Args:
        messages (`list[dict]`): chat messages in the standard multimodal format, e.g. `{"role": "user", "content":
            [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}`; assistant content is
            `[{"type": "text", "text": ...}]`.
        images (`list`): one image reference (path, PIL image or `{"bytes"/"path"}` dict) per `{"type": "image"}`
            item, in message order.
    """

    messages: list[dict[str, Any]]
    images: list[Any]


def load_llava_records(
    path: str | os.PathLike, *, skipped: Counter | None = None, skip_examples: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """
    Reads a LLaVA-format `.json` file (a list of records) or `.jsonl` file (one record per line), UTF-8 with or without
    a byte-order mark. Relative image paths are resolved against the file's directory.

    A JSONL file is read line by line (memory stays flat however large the file): a line that is not UTF-8 or not
    JSON (for instance a torn last line left by an interrupted write) is skipped, logged with its file and line number
    and counted as `"malformed"` in `skipped`. A JSON list is parsed as a whole, so one undecodable byte in it is an
    error naming the file and the line.

    Args:
        path (`str` or `os.PathLike`): the data file.
        skipped (`collections.Counter`, *optional*): receives the count of unusable lines.
        skip_examples (`dict[str, str]`, *optional*): receives the first problem (`"<file>:<line>: ..."`) under
            `"malformed"` unless it already holds one.

    Returns:
        `list[dict]`: the records (non-dict entries are kept, to be counted as malformed by [`DistillationDataset`]).

    Raises:
        [`~specvlm_hf.errors.UserFileNotFoundError`] when `path` does not exist, [`~specvlm_hf.errors.UserValueError`]
        when it is a folder, not UTF-8 text at all, or a JSON list that does not decode or parse.
    """
    root = os.path.dirname(os.path.abspath(os.fspath(path)))
    return [
        _resolve_image_paths(record, root)
        for _, record in _iter_llava_file(path, skipped=skipped, skip_examples=skip_examples)
    ]


def _check_data_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"no data file at {path}")
    if os.path.isdir(path):
        raise UserValueError(f"{path} is a folder; pass a LLaVA-format .json or .jsonl file")


def _first_byte(path: str) -> bytes:
    """The first byte after a UTF-8 byte-order mark and leading whitespace (`b""` for a blank file)."""
    with open(path, "rb") as handle:
        chunk = handle.read(1 << 16)
        if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-32 LE starts like UTF-16 LE
            raise UserValueError(
                f"{path} is UTF-16 or UTF-32 encoded text; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)"
            )
        if chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        while chunk:
            stripped = chunk.lstrip(_WHITESPACE)
            if stripped:
                return stripped[:1]
            chunk = handle.read(1 << 16)
    return b""


def _iter_llava_file(
    path: str | os.PathLike, *, skipped: Counter | None = None, skip_examples: dict[str, str] | None = None
) -> Iterator[tuple[int | None, Any]]:
    """
    Yields `(line_number, record)` for every parseable record of a `.json` list (line number `None`) or `.jsonl` file,
    counting and logging the lines it skips (see [`load_llava_records`]).
    """
    path = os.fspath(path)
    _check_data_file(path)
    if _first_byte(path) == b"[":
        with open(path, "rb") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            raise UserValueError(
                f"{path}: line {line}: not UTF-8 text ({error.reason}, byte 0x{raw[error.start]:02x}); a JSON list is "
                "read as a whole: save the file as UTF-8, or as JSONL (one record per line) to skip bad records"
            ) from error
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserValueError(
                f"{path} looks like a JSON list but does not parse: line {error.lineno} column {error.colno}: "
                f"{error.msg}"
            ) from error
        for record in records:
            yield None, record
        return

    bad_lines = undecodable = found = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                undecodable += 1
                problem = f"not UTF-8 ({error.reason}, byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            else:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    torn = not raw.endswith(b"\n")
                    what = "torn last line (no newline at the end: an interrupted write?)" if torn else "not JSON"
                    problem = f"{what} ({error.msg})"
                else:
                    found += 1
                    yield line_number, record
                    continue
            bad_lines += 1
            detail = f"{path}:{line_number}: {problem}"
            if skip_examples is not None:
                skip_examples.setdefault("malformed", detail)
            if bad_lines <= _LOGGED_BAD_LINES:
                logger.warning("%s; line skipped", detail)
    if undecodable and not found:
        raise UserValueError(
            f"{path} is not UTF-8 text: {undecodable} of its lines do not decode and none holds a record; save it "
            "as UTF-8"
        )
    if bad_lines:
        logger.warning("%s: %d unusable line(s) skipped in total", path, bad_lines)
        if skipped is not None:
            skipped["malformed"] += bad_lines


def _image_refs(record: Mapping[str, Any]) -> list[Any]:
    refs = record.get("images", record.get("image"))
    if refs is None:
        return []
    if isinstance(refs, (str, os.PathLike, Image.Image, Mapping)):
        return [refs]
    if isinstance(refs, Sequence):
        return list(refs)
    raise BadRecord("malformed", f"'images' must be a path, an image or a list of them, got {type(refs).__name__}")


def _resolve_image_paths(record: Any, root: str) -> Any:
    if not isinstance(record, Mapping):
        return record
    try:
        refs = _image_refs(record)
    except BadRecord:
        return record
    resolved = [
        os.path.join(root, os.fspath(ref)) if isinstance(ref, (str, os.PathLike)) and not os.path.isabs(ref) else ref
        for ref in refs
    ]
    out = {key: value for key, value in record.items() if key != "image"}
    out["images"] = resolved
    return out


def parse_llava_record(record: Any, *, text_only: bool = False) -> LlavaConversation:
    """
    Validates a LLaVA record and converts it to chat messages.

    Args:
        record (`dict`): a LLaVA-format record.
        text_only (`bool`, *optional*, defaults to `False`): render contents as plain strings (for targets processed
            by a tokenizer); records with images are then malformed.

    Returns:
        [`LlavaConversation`]

    Raises:
        [`BadRecord`] with reason `"malformed"` or `"no_assistant_turn"`.
    """
    if not isinstance(record, Mapping):
        raise BadRecord("malformed", f"a record must be a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, Sequence) or isinstance(turns, str) or len(turns) == 0:
        raise BadRecord("malformed", "'conversations' must be a non-empty list of turns")
    images = _image_refs(record)
    parsed: list[tuple[str, str]] = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadRecord("malformed", f"turn {position} must be an object with a string 'value'")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadRecord("malformed", f"turn {position} has unknown role {turn.get('from')!r}")
        if role != "user" and _IMAGE_PLACEHOLDER in turn["value"]:
            raise BadRecord("malformed", f"turn {position} ({role}) contains an image placeholder")
        parsed.append((role, turn["value"]))
    speakers = [role for role, _ in parsed if role != "system"]
    if not speakers or speakers[0] != "user":
        raise BadRecord("malformed", "the conversation must start with a user turn")
    last_answer = max(
        (i for i, (role, text) in enumerate(parsed) if role == "assistant" and text.strip()), default=None
    )
    if last_answer is None:
        raise BadRecord("no_assistant_turn", "the record has no non-empty assistant turn")
    parsed = parsed[: last_answer + 1]  # trailing user turns teach nothing
    placeholders = sum(text.count(_IMAGE_PLACEHOLDER) for _, text in parsed)
    if text_only and images:
        raise BadRecord("malformed", "the record has images but the target is processed by a tokenizer (text only)")
    if placeholders and placeholders != len(images):
        raise BadRecord("malformed", f"{placeholders} '<image>' placeholders for {len(images)} images")
    prepend = len(images) if placeholders == 0 else 0

    messages = []
    for role, text in parsed:
        content: list[dict[str, Any]] = []
        if role == "user" and prepend:
            content += [{"type": "image"}] * prepend
            prepend = 0
        for index, part in enumerate(text.split(_IMAGE_PLACEHOLDER)):
            if index > 0:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        if text_only:
            messages.append({"role": role, "content": "\n".join(item["text"] for item in content)})
        else:
            messages.append({"role": role, "content": content})
    return LlavaConversation(messages=messages, images=images)


def load_image(ref: Any, image_root: str | os.PathLike | None = None) -> Image.Image:
    """
    Opens one image reference as an RGB PIL image.

    Args:
        ref: a path (relative paths are resolved against `image_root`, else the working directory), a PIL image or a
            `datasets`-style dict with `"bytes"` or `"path"`.
        image_root (`str`, *optional*): directory of relative paths.

    Raises:
        [`BadRecord`] with reason `"missing_image"`, `"unreadable_image"` or `"malformed"`.
    """
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            source: Any = io.BytesIO(ref["bytes"])
            name = "<bytes>"
        elif ref.get("path") is not None:
            return load_image(ref["path"], image_root)
        else:
            raise BadRecord("malformed", "an image dict needs 'bytes' or 'path'")
    elif isinstance(ref, (str, os.PathLike)):
        name = os.fspath(ref)
        if image_root is not None and not os.path.isabs(name):
            name = os.path.join(os.fspath(image_root), name)
        if not os.path.isfile(name):
            raise BadRecord("missing_image", f"no image file at {name}")
        source = name
    else:
        raise BadRecord("malformed", f"an image must be a path, a PIL image or a dict, got {type(ref).__name__}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadRecord("unreadable_image", f"{name}: {error}") from error


def tokenizer_of(processing_class: ProcessorMixin | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer of a processor, or the tokenizer itself."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def _tokenize(
    processing_class: ProcessorMixin | PreTrainedTokenizerBase, text: str, images: list[Image.Image], **kwargs: Any
) -> BatchFeature:
    """Runs the processor (or tokenizer) on one rendered conversation; returns batch-of-one tensors."""
    bos = tokenizer_of(processing_class).bos_token
    kwargs["add_special_tokens"] = not (bos is not None and text.startswith(bos))  # the template may add BOS
    if isinstance(processing_class, ProcessorMixin):
        return processing_class(text=[text], images=[images] if images else None, return_tensors="pt", **kwargs)
    kwargs.pop("return_text_replacement_offsets", None)
    return processing_class(text, return_tensors="pt", return_token_type_ids=False, **kwargs)


def _assistant_char_spans(
    processing_class: ProcessorMixin | PreTrainedTokenizerBase, messages: list[dict[str, Any]], text: str
) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (answer + end-of-turn marker, trailing whitespace excluded)."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = processing_class.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = processing_class.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(header) and text.startswith(through)):
            raise BadRecord(
                "template_error",
                f"rendering turn {index} alone is not a prefix of the whole conversation; this chat template cannot "
                "be masked turn by turn",
            )
        end = len(through.rstrip())
        if end > len(header):
            spans.append((len(header), end))
    return spans


def encode_conversation(
    processing_class: ProcessorMixin | PreTrainedTokenizerBase,
    conversation: LlavaConversation,
    images: list[Image.Image],
    *,
    max_length: int | None = None,
    assistant_only_loss: bool = True,
) -> dict[str, torch.Tensor]:
    """
    Renders and tokenises one conversation with labels.

    Args:
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`]): the
            target's processor (tokenizer for text-only targets); its chat template renders the messages.
        conversation ([`LlavaConversation`]): parsed record.
        images (`list[PIL.Image.Image]`): the loaded images, one per image item.
        max_length (`int`, *optional*): longest allowed sequence.
        assistant_only_loss (`bool`, *optional*, defaults to `True`): label only assistant tokens (else every text
            token; image placeholders never).

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels` (and per-token type ids when the processor
        returns them) of shape `(sequence_length,)`, plus the processor's pixel inputs as it returns them for one
        sample (e.g. `pixel_values (num_images, 3, H, W)`, `image_grid_thw (num_images, 3)`).

    Raises:
        [`BadRecord`] with reason `"template_error"`, `"processor_error"`, `"too_long"` or `"no_assistant_turn"`.
    """
    try:
        text = processing_class.apply_chat_template(conversation.messages, tokenize=False)
        spans = _assistant_char_spans(processing_class, conversation.messages, text) if assistant_only_loss else []
        encoded = _tokenize(
            processing_class, text, images, return_offsets_mapping=True, return_text_replacement_offsets=True
        )
    except BadRecord:
        raise
    except Exception as error:  # any processor failure on this record (sizes, templates, ...) skips only this record
        raise BadRecord("processor_error", f"{type(error).__name__}: {error}") from error

    input_ids = encoded.pop("input_ids")[0]
    length = input_ids.shape[0]
    if max_length is not None and length > max_length:
        raise BadRecord("too_long", f"{length} tokens > max_length={max_length}")
    offsets = encoded.pop("offset_mapping")[0]
    replacements = (encoded.pop("text_replacement_offsets", None) or [[]])[0]
    starts, ends = offsets[:, 0], offsets[:, 1]

    # Character positions of the rendered text move right by what the placeholders before them expanded into.
    placeholder_ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]

    def overlapping(begin: int, end: int) -> torch.Tensor:
        return (starts < end) & (ends > begin)

    if assistant_only_loss:
        keep = torch.zeros(length, dtype=torch.bool)
        for begin, end in spans:
            keep |= overlapping(
                begin + gained[bisect.bisect_right(placeholder_ends, begin)],
                end + gained[bisect.bisect_right(placeholder_ends, end)],
            )
    else:
        keep = ends > starts  # every real text token (added special tokens have empty offsets)
        for replacement in replacements:
            keep &= ~overlapping(*replacement["new_span"])
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if not bool((labels[2:] != IGNORE_INDEX).any()):
        raise BadRecord("no_assistant_turn", "no labelled token the draft could be trained to predict")

    example = {"input_ids": input_ids, "labels": labels}
    for key, value in encoded.items():
        if not isinstance(value, torch.Tensor):
            continue
        example[key] = value[0] if key in _PER_TOKEN_PAD else value
    example.setdefault("attention_mask", torch.ones(length, dtype=torch.long))
    return example


def encode_prompt(
    processing_class: ProcessorMixin | PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    images: list[Image.Image],
) -> BatchFeature:
    """
    Tokenises a conversation prefix ending with a user turn, with the generation prompt, ready for `generate`.

    Args:
        processing_class: the target's processor or tokenizer.
        messages (`list[dict]`): messages up to (and including) the user turn to answer.
        images (`list[PIL.Image.Image]`): the images of those messages, in order.

    Returns:
        [`~transformers.BatchFeature`] with a batch dimension of 1.
    """
    text = processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _tokenize(processing_class, text, images)


def to_model_inputs(inputs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Moves tensors to `device` and floating-point tensors (pixel values) to the model's `dtype`."""
    return {
        key: (value.to(device, dtype) if torch.is_floating_point(value) else value.to(device))
        if isinstance(value, torch.Tensor)
        else value
        for key, value in inputs.items()
    }


def count_images(messages: Iterable[dict[str, Any]]) -> int:
    """Number of `{"type": "image"}` items in `messages`."""
    return sum(
        1
        for message in messages
        if not isinstance(message["content"], str)
        for item in message["content"]
        if item.get("type") == "image"
    )


class DistillationDataset(Dataset):
    r"""
    LLaVA-format conversations, validated once and tokenised on access.

    Construction runs the processor over every record once to find the unusable ones: each is **skipped and counted**
    by reason in `skipped` (see [`SKIP_REASONS`]; the first detail per reason is kept in `skip_examples`) and the
    counts are logged. Items are re-encoded on access (images are not cached), so memory stays flat for large sets.

    A record that passed validation but fails on access (its image was deleted, moved or overwritten meanwhile) does
    not stop training either: it is logged with its file and line (or record index), counted by reason in
    `failed_in_use` (included in [`skip_summary`] and so in the model card) and replaced by the next usable record,
    so batches keep their size. Failures seen in data-loader worker processes reach the main process through the
    item's `"failed_records"` entry, which [`DistillationCollator`] gathers and [`OnlineDistillationTrainer`] counts
    with [`record_failures`].

    Args:
        data (`str`, `os.PathLike`, `list[dict]` or `datasets.Dataset`):
            A `.json`/`.jsonl` file (relative image paths resolve against its directory), or records.
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`]):
            The target's processor (a tokenizer for text-only targets).
        max_length (`int`, *optional*, defaults to 2048):
            Longest sample in tokens (image tokens included); longer records are skipped (`too_long`).
        assistant_only_loss (`bool`, *optional*, defaults to `True`):
            Label only assistant tokens.
        image_root (`str`, *optional*):
            Directory for relative image paths of in-memory records.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar during validation.

    Attributes:
        skipped (`collections.Counter`): skipped records per reason.
        skip_examples (`dict[str, str]`): the first problem seen for each reason.
        failed_in_use (`collections.Counter`): records that passed validation but failed on access, per reason.
        lengths (`list[int]`): token length of every usable record.
        label_token_counts (`collections.Counter`): how often each token id is a training target, i.e. the token
            frequencies of the data the draft learns to predict (input of `build_draft_vocab`).
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[Mapping[str, Any]] | Any,
        processing_class: ProcessorMixin | PreTrainedTokenizerBase,
        *,
        max_length: int | None = 2048,
        assistant_only_loss: bool = True,
        image_root: str | os.PathLike | None = None,
        show_progress: bool = True,
    ):
        self.processing_class = processing_class
        self.max_length = max_length
        self.assistant_only_loss = assistant_only_loss
        self.image_root = image_root
        self.skipped: Counter = Counter()
        self.skip_examples: dict[str, str] = {}
        self.source = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
        self._line_numbers: list[int | None] | None = None  # file line of each record (JSONL), for messages
        if self.source is not None:
            root = os.path.dirname(os.path.abspath(self.source))
            self.records, self._line_numbers = [], []
            for line_number, record in _iter_llava_file(
                self.source, skipped=self.skipped, skip_examples=self.skip_examples
            ):
                self.records.append(_resolve_image_paths(record, root))
                self._line_numbers.append(line_number)
        else:
            self.records = data
        self._unparseable = self.skipped["malformed"]
        self.failed_in_use: Counter = Counter()
        self._failed_positions: set[int] = set()  # usable positions known to fail now (this process)
        self._failed_records: set[int] = set()  # record indices counted in failed_in_use
        self._text_only = not isinstance(processing_class, ProcessorMixin)
        self._indices: list[int] = []
        self.lengths: list[int] = []
        self.label_token_counts: Counter = Counter()
        for index in tqdm(range(len(self.records)), desc="Validating records", disable=not show_progress):
            try:
                example = self._encode(index)
            except BadRecord as bad:
                self.skipped[bad.reason] += 1
                self.skip_examples.setdefault(bad.reason, f"{self.location(index)}: {bad.detail}")
                continue
            self._indices.append(index)
            self.lengths.append(int(example["input_ids"].shape[0]))
            targets = example["labels"][2:]
            self.label_token_counts.update(targets[targets != IGNORE_INDEX].tolist())
        self._log_summary()
        if not self._indices:
            raise UserValueError(
                f"None of the {self.num_records} records is usable: {self.skip_summary()}. First problem per reason: "
                + "; ".join(f"{reason}: {detail}" for reason, detail in self.skip_examples.items())
            )

    @property
    def num_records(self) -> int:
        """Records read, usable or not (unparseable lines included)."""
        return len(self.records) + self._unparseable

    def skip_summary(self) -> str:
        """
        `"3 skipped (missing_image: 2, too_long: 1)"`-style summary, followed by `"; 1 failed after validation
        (missing_image: 1)"` when records failed on access.
        """
        summary = f"{sum(self.skipped.values())} skipped{_by_reason(self.skipped)}"
        if self.failed_in_use:
            summary += f"; {sum(self.failed_in_use.values())} failed after validation{_by_reason(self.failed_in_use)}"
        return summary

    def _log_summary(self) -> None:
        message = f"Distillation data: {len(self._indices)} usable records, {self.skip_summary()}."
        if self.skipped or self.failed_in_use:
            logger.warning(message + " First problem per reason: %s", self.skip_examples)
        else:
            logger.info(message)

    def log_summary(self) -> None:
        """Logs the counts of skipped (and failed-after-validation) records, as after validation."""
        self._log_summary()

    def location(self, record_index: int) -> str:
        """Where record `record_index` comes from: `"data.jsonl:17"`, `"data.json, record 12"` or `"record 12"`."""
        line = self._line_numbers[record_index] if self._line_numbers is not None else None
        if self.source is not None and line is not None:
            return f"{self.source}:{line}"
        return f"{self.source}, record {record_index}" if self.source is not None else f"record {record_index}"

    def record_failures(self, failures: Iterable[tuple[int, str, str]]) -> None:
        """
        Counts records that passed validation but failed on access, as `(record_index, reason, detail)` entries
        (reported by [`__getitem__`] directly, or through the `"failed_records"` entry of items and batches made in
        data-loader worker processes); a record is counted once.
        """
        for record_index, reason, detail in failures:
            if record_index in self._failed_records:  # a worker of a later epoch met it again
                continue
            self._failed_records.add(record_index)
            self.failed_in_use[reason] += 1
            where = f"{self.location(record_index)}: {detail}"
            self.skip_examples.setdefault(reason, where)
            if sum(self.failed_in_use.values()) <= _LOGGED_BAD_LINES:
                logger.warning(
                    "%s: the record passed validation but now fails (%s: %s); skipped and replaced by the next "
                    "usable record",
                    self.location(record_index),
                    reason,
                    detail,
                )

    def record_index(self, index: int) -> int:
        """Index in `records` of the `index`-th usable record."""
        return self._indices[index]

    def conversation(self, index: int) -> LlavaConversation:
        """The parsed conversation of the `index`-th usable record."""
        return parse_llava_record(self.records[self._indices[index]], text_only=self._text_only)

    def images(self, conversation: LlavaConversation, count: int | None = None) -> list[Image.Image]:
        """Loads the first `count` (default: all) images of `conversation`."""
        refs = conversation.images if count is None else conversation.images[:count]
        return [load_image(ref, self.image_root) for ref in refs]

    def _encode(self, record_index: int) -> dict[str, torch.Tensor]:
        conversation = parse_llava_record(self.records[record_index], text_only=self._text_only)
        return encode_conversation(
            self.processing_class,
            conversation,
            self.images(conversation),
            max_length=self.max_length,
            assistant_only_loss=self.assistant_only_loss,
        )

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """
        The `index`-th usable record, encoded; a record that fails now (see the class docstring) is counted and
        replaced by the next usable one.

        Raises:
            [`~specvlm_hf.errors.UserValueError`] when every usable record fails now.
        """
        count = len(self._indices)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} usable records")
        position = index % count
        failures: list[tuple[int, str, str]] = []
        example = None
        for _ in range(count):
            if position not in self._failed_positions:
                try:
                    example = self._encode(self._indices[position])
                    break
                except BadRecord as bad:
                    self._failed_positions.add(position)
                    failures.append((self._indices[position], bad.reason, bad.detail))
            position = (position + 1) % count
        in_worker = get_worker_info() is not None
        if failures and not in_worker:
            self.record_failures(failures)
        if example is None:
            raise UserValueError(
                f"every usable record of {self.source or 'the data'} now fails ({self.skip_summary()}; e.g. "
                f"{self.skip_examples.get(failures[0][1]) if failures else 'see the log'}): were the images moved?"
            )
        if failures and in_worker:  # this is a copy of the dataset: the main process counts and logs them
            example[FAILED_RECORDS_KEY] = failures
        return example

    def prompt(self, index: int) -> BatchFeature:
        """
        The `index`-th usable record cut before its first assistant turn, tokenised with the generation prompt.

        Returns:
            [`~transformers.BatchFeature`] for `target.generate(**prompt)` (batch of 1).
        """
        conversation = self.conversation(index)
        first_answer = next(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
        messages = conversation.messages[:first_answer]
        return encode_prompt(self.processing_class, messages, self.images(conversation, count_images(messages)))


@dataclass
class DistillationCollator:
    r"""
    Pads [`DistillationDataset`] items into a batch for the teacher and the draft.

    Per-token keys (`input_ids`, `attention_mask`, `labels`, `mm_token_type_ids`, `token_type_ids`) are right-padded to
    the longest sample. Every other tensor (the processor's pixel inputs: `pixel_values`, `image_grid_thw`,
    `image_sizes`, `pixel_attention_mask`, ...) is concatenated along its first dimension, zero-padding the other
    dimensions to a common shape (Llava-NeXT crops, Idefics3 image counts).

    Records a data-loader worker had to replace (the items' `"failed_records"` lists, see [`DistillationDataset`])
    are gathered into the batch's `"failed_records"` list for the trainer to count.

    The batch also holds `shift_labels` of shape `(batch_size, sequence_length)`: `shift_labels[:, t] = labels[:, t +
    2]` (`-100` for the last two positions), the token the draft predicts at draft position `t` (it reads the
    embedding of `x_{t+1}` and the feature of `x_t`, and regresses the feature that predicts `x_{t+2}`). Trainer counts
    `shift_labels != -100` for `num_items_in_batch`, so the loss normalisation counts exactly the predicted tokens.

    Args:
        pad_token_id (`int`, *optional*, defaults to 0):
            Filler for `input_ids` (masked out by `attention_mask`).
    """

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        length = max(int(feature["input_ids"].shape[0]) for feature in features)
        batch: dict[str, Any] = {}
        failed = [entry for feature in features for entry in feature.get(FAILED_RECORDS_KEY, ())]
        keys = dict.fromkeys(key for feature in features for key in feature if key != FAILED_RECORDS_KEY)
        for key in keys:
            values = [feature[key] for feature in features if key in feature]
            if key in _PER_TOKEN_PAD:
                if len(values) != len(features):
                    raise ValueError(f"per-token key {key!r} is missing from some examples")
                fill = self.pad_token_id if key == "input_ids" else _PER_TOKEN_PAD[key]
                padded = values[0].new_full((len(values), length), fill)
                for row, value in enumerate(values):
                    padded[row, : value.shape[0]] = value
                batch[key] = padded
            else:
                batch[key] = _concat_padded(values)
        labels = batch["labels"]
        shift_labels = labels.new_full(labels.shape, IGNORE_INDEX)
        shift_labels[:, :-2] = labels[:, 2:]
        batch["shift_labels"] = shift_labels
        if failed:
            batch[FAILED_RECORDS_KEY] = failed
        return batch


def _by_reason(counts: Counter) -> str:
    parts = ", ".join(f"{reason}: {counts[reason]}" for reason in SKIP_REASONS if counts[reason])
    return f" ({parts})" if parts else ""


def _concat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along dim 0 after zero-padding every other dimension to the largest size."""
    shape = [max(value.shape[d] for value in values) for d in range(1, values[0].dim())]
    padded = []
    for value in values:
        if list(value.shape[1:]) != shape:
            grown = value.new_zeros((value.shape[0], *shape))
            grown[tuple(slice(0, size) for size in value.shape)] = value
            value = grown
        padded.append(value)
    return torch.cat(padded, dim=0)
