# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""
Streaming LLaVA-format data: records read lazily through a `datasets.IterableDataset`, so memory stays flat however
large the files are, with the same tolerance of bad records as [`DistillationDataset`].

A `.jsonl` file is read line by line; a `.json` list is decoded record by record from a bounded buffer. A line that is
not UTF-8 or not JSON (a torn last line), a record that does not parse as a conversation, or one whose image is
missing or unreadable is **skipped, counted by reason and logged with its `file:line`**; it never stops a run.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from ..errors import UserValueError
from .data import (
    FAILED_RECORDS_KEY,
    BadRecord,
    _by_reason,
    _check_data_file,
    _first_byte,
    _resolve_image_paths,
    encode_conversation,
    load_image,
    parse_llava_record,
)

logger = logging.getLogger(__name__)

__all__ = ["StreamingDistillationDataset", "stream_llava_files"]

#: Bytes read from a `.json` list at a time (the decoder's buffer holds about this much plus one record).
_CHUNK = 1 << 20
_LOGGED_PROBLEMS = 3
_WHITESPACE = " \t\r\n"


def _jsonl_items(path: str) -> Iterator[dict[str, Any]]:
    """Items of a `.jsonl` file: one per non-blank line, with its `text` or the `problem` that makes it unusable."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            location = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problem = f"not UTF-8 ({error.reason}, byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                yield {"location": location, "text": None, "problem": problem}
                continue
            if not text.strip():
                continue
            try:
                json.loads(text)
            except json.JSONDecodeError as error:
                torn = not raw.endswith(b"\n")
                what = "torn last line (no newline at the end: an interrupted write?)" if torn else "not JSON"
                yield {"location": location, "text": None, "problem": f"{what} ({error.msg})"}
                continue
            yield {"location": location, "text": text, "problem": None}


def _json_list_items(path: str) -> Iterator[dict[str, Any]]:
    """
    Items of a `.json` list, decoded one element at a time from a buffer of about `_CHUNK` characters. A list that
    does not decode or parse raises a [`~specvlm_hf.errors.UserValueError`] naming the line (the position of the next
    element cannot be known after a syntax error).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    buffer, start, line, done = "", 0, 1, False  # buffer[start:] is unread; `line` is the line of buffer[start]
    offset = 0  # bytes read so far, for messages

    def more() -> bool:
        nonlocal buffer, start, done, offset
        if done:
            return False
        with_bytes = handle.read(_CHUNK)
        try:
            text = utf8.decode(with_bytes, final=not with_bytes)
        except UnicodeDecodeError as error:
            bad_line = line + buffer.count("\n", start)
            raise UserValueError(
                f"{path}: near line {bad_line}: not UTF-8 text ({error.reason}, byte 0x{with_bytes[error.start]:02x}); "
                "save the file as UTF-8, or as JSONL (one record per line) to skip bad records"
            ) from error
        offset += len(with_bytes)
        done = not with_bytes
        buffer = buffer[start:] + text
        start = 0
        return bool(text) or not done

    def skip_blank() -> None:
        nonlocal start, line
        while True:
            while start < len(buffer) and buffer[start] in _WHITESPACE:
                line += buffer[start] == "\n"
                start += 1
            if start < len(buffer) or not more():
                return

    def fail(message: str) -> UserValueError:
        return UserValueError(f"{path} looks like a JSON list but does not parse: line {line}: {message}")

    with open(path, "rb") as handle:
        skip_blank()
        if buffer[start : start + 1] != "[":
            raise fail("expected '['")
        start += 1
        first = True
        while True:
            skip_blank()
            if start >= len(buffer):
                raise fail("the list is not closed (a torn file?)")
            if buffer[start] == "]":
                return
            if not first:
                if buffer[start] != ",":
                    raise fail(f"expected ',' or ']', found {buffer[start]!r}")
                start += 1
                skip_blank()
            first = False
            while True:
                try:
                    _, end = decoder.raw_decode(buffer, start)
                except json.JSONDecodeError as error:
                    if more():
                        continue
                    raise fail(error.msg) from error
                if end < len(buffer) or done or not more():  # a number cut at the buffer's end would parse short
                    break
            text = buffer[start:end]
            yield {"location": f"{path}:{line}", "text": text, "problem": None}
            line += text.count("\n")
            start = end


def stream_llava_files(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """
    The generator behind [`StreamingDistillationDataset`]: for each file, one item per record, `{"location":
    "<file>:<line>", "text": <the record's JSON text> or None, "problem": <why it is unusable> or None}`. Reads each
    file lazily (line by line, or a bounded buffer for a `.json` list); `datasets` shards the list of `paths` over
    data-loader workers.

    Args:
        paths (`list[str]`): `.json` / `.jsonl` files.
    """
    for path in paths:
        yield from (_json_list_items(path) if _first_byte(path) == b"[" else _jsonl_items(path))


class StreamingDistillationDataset(IterableDataset):
    r"""
    LLaVA-format conversations streamed from `.json` / `.jsonl` files (or any iterable of records, e.g. a
    `datasets.IterableDataset` from `load_dataset(..., streaming=True)`), encoded as they are read: an
    `IterableDataset` that [`OnlineDistillationTrainer`] and [`~transformers.Trainer`] accept (set `max_steps`: a
    stream has no length). Memory stays flat: nothing is read ahead except the optional shuffle buffer.

    Unlike [`DistillationDataset`] there is no validation pass: a record that cannot be used (a line that is not UTF-8
    or not JSON, e.g. a torn last line; a malformed conversation; a missing or unreadable image; a sample longer than
    `max_length`) is skipped when it is met, **counted once by reason** in `skipped` (same reasons as
    [`SKIP_REASONS`]) and logged with its `file:line`; the first detail per reason is kept in `skip_examples`.
    Problems met in data-loader worker processes reach the main process through the next item's `"failed_records"`
    entry ([`DistillationCollator`] gathers it, the trainer calls [`record_failures`]). A pass that yields no usable
    record raises a [`~specvlm_hf.errors.UserValueError`].

    Files are read through `datasets.IterableDataset.from_generator` over [`stream_llava_files`], so several files
    are sharded over data-loader workers and `shuffle_buffer_size` uses `datasets`' buffered shuffle (reseeded every
    epoch through [`set_epoch`]). Under `accelerate launch` the Trainer's data loader reads the stream on the main
    process and dispatches the batches.

    Args:
        data (`str`, `os.PathLike`, `list` of them, or an iterable of records):
            Data files (relative image paths resolve against each file's directory), or records.
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`]):
            The target's processor (a tokenizer for text-only targets).
        max_length (`int`, *optional*, defaults to 2048):
            Longest sample in tokens (image tokens included); longer records are skipped (`too_long`).
        assistant_only_loss (`bool`, *optional*, defaults to `True`):
            Label only assistant tokens.
        image_root (`str`, *optional*):
            Directory for relative image paths of in-memory records.
        shuffle_buffer_size (`int`, *optional*, defaults to 0):
            Shuffle through a buffer of this many records (`0`: file order).
        seed (`int`, *optional*, defaults to 0):
            Seed of the shuffle.

    Attributes:
        skipped (`collections.Counter`): unusable records per reason (each counted once, however many epochs).
        skip_examples (`dict[str, str]`): the first problem seen for each reason, with its location.
        records_read (`int`): records (and unusable lines) this process has taken from the stream so far.
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[Mapping[str, Any]],
        processing_class: ProcessorMixin | PreTrainedTokenizerBase,
        *,
        max_length: int | None = 2048,
        assistant_only_loss: bool = True,
        image_root: str | os.PathLike | None = None,
        shuffle_buffer_size: int = 0,
        seed: int = 0,
    ):
        import datasets

        if shuffle_buffer_size < 0:
            raise UserValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        self.processing_class = processing_class
        self.max_length = max_length
        self.assistant_only_loss = assistant_only_loss
        self.image_root = image_root
        self._text_only = not isinstance(processing_class, ProcessorMixin)
        self.skipped: Counter = Counter()
        self.skip_examples: dict[str, str] = {}
        self._counted: set[str] = set()  # locations already counted
        self.records_read = 0
        paths = [data] if isinstance(data, (str, os.PathLike)) else None
        is_path = lambda item: isinstance(item, (str, os.PathLike))  # noqa: E731
        if paths is None and isinstance(data, Sequence) and data and all(is_path(item) for item in data):
            paths = list(data)
        if paths is not None:
            paths = [os.fspath(path) for path in paths]
            for path in paths:
                _check_data_file(path)
                _first_byte(path)  # refuses UTF-16 / UTF-32 files up front
            self.source: str | None = paths[0] if len(paths) == 1 else ", ".join(paths)
            features = datasets.Features(
                {name: datasets.Value("string") for name in ("location", "text", "problem")}
            )
            stream = datasets.IterableDataset.from_generator(
                stream_llava_files, gen_kwargs={"paths": paths}, features=features
            )
            self._from_files = True
        else:
            self.source = None
            stream = data
            self._from_files = False
        self._seed, self._epoch = seed, 0
        self._shuffle_in_memory = False  # records given as a list are shuffled whole, per epoch
        if shuffle_buffer_size and isinstance(stream, datasets.IterableDataset):
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        elif shuffle_buffer_size and isinstance(stream, Sequence):
            self._shuffle_in_memory = True
        elif shuffle_buffer_size:
            raise UserValueError(
                "shuffle_buffer_size needs data files, a list of records or a datasets.IterableDataset (shuffle "
                "other iterables yourself, or pass 0)"
            )
        self.stream = stream

    # ------------------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Reseeds the shuffle buffer for `epoch` (called by the Trainer)."""
        self._epoch = epoch
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    @property
    def num_records(self) -> int:
        """Records taken from the stream so far by this process (unusable lines included)."""
        return self.records_read

    def skip_summary(self) -> str:
        """`"3 skipped (malformed: 2, missing_image: 1)"`-style summary of the records met so far."""
        return f"{sum(self.skipped.values())} skipped{_by_reason(self.skipped)}"

    def log_summary(self) -> None:
        """Logs the counts of skipped records."""
        message = f"Streaming distillation data ({self.source or 'records'}): {self.skip_summary()}."
        if self.skipped:
            logger.warning(message + " First problem per reason: %s", self.skip_examples)
        else:
            logger.info(message)

    def record_failures(self, failures: Iterable[tuple[str, str, str]]) -> None:
        """
        Counts unusable records given as `(location, reason, detail)` (met in this process, or reported by a
        data-loader worker through an item's `"failed_records"` entry); each location is counted once.
        """
        for location, reason, detail in failures:
            if location in self._counted:
                continue
            self._counted.add(location)
            self.skipped[reason] += 1
            where = f"{location}: {detail}"
            self.skip_examples.setdefault(reason, where)
            if sum(self.skipped.values()) <= _LOGGED_PROBLEMS:
                logger.warning("%s; record skipped (%s)", where, reason)

    # ------------------------------------------------------------------------------------------------------------
    def _records(self) -> Iterator[tuple[str, Any, str | None]]:
        """`(location, record or None, problem)` for every item of the stream, read lazily."""
        numbered: Iterable[tuple[int, Any]] = enumerate(self.stream)
        if self._shuffle_in_memory:
            order = list(range(len(self.stream)))
            random.Random(self._seed + self._epoch).shuffle(order)
            numbered = ((i, self.stream[i]) for i in order)
        for index, item in numbered:
            if self._from_files:
                location = item["location"]
                if item["problem"] is not None:
                    yield location, None, item["problem"]
                    continue
                root = os.path.dirname(os.path.abspath(location.rsplit(":", 1)[0]))
                yield location, _resolve_image_paths(json.loads(item["text"]), root), None
            else:
                yield f"record {index}", item, None

    def _encode(self, record: Any) -> dict[str, torch.Tensor]:
        conversation = parse_llava_record(record, text_only=self._text_only)
        images = [load_image(ref, self.image_root) for ref in conversation.images]
        return encode_conversation(
            self.processing_class,
            conversation,
            images,
            max_length=self.max_length,
            assistant_only_loss=self.assistant_only_loss,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        in_worker = get_worker_info() is not None
        pending: list[tuple[str, str, str]] = []  # problems not yet handed to the main process (workers)
        usable = 0
        for location, record, problem in self._records():
            self.records_read += 1
            if problem is not None:
                failure = (location, "malformed", problem)
            else:
                try:
                    example = self._encode(record)
                except BadRecord as bad:
                    failure = (location, bad.reason, bad.detail)
                else:
                    usable += 1
                    if pending:
                        example[FAILED_RECORDS_KEY] = pending
                        pending = []
                    yield example
                    continue
            if in_worker:
                pending.append(failure)
            else:
                self.record_failures([failure])
        if pending:  # problems after the worker's last usable record: counted in the worker's copy only
            self.record_failures(pending)
        if not in_worker:
            self.log_summary()
        if usable == 0 and not in_worker:
            raise UserValueError(
                f"None of the {self.records_read} records of {self.source or 'the data'} is usable: "
                f"{self.skip_summary()}. First problem per reason: "
                + "; ".join(f"{reason}: {detail}" for reason, detail in self.skip_examples.items())
            )
