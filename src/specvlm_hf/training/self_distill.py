# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Self-distillation data (ViSpec §4.3): regenerate the assistant answers of a LLaVA-format dataset with the target.

A draft learns the distribution it will meet at inference best from the target's own outputs: dataset answers are
often short and written by someone else. ViSpec regenerates long answers (its prompts ask for "at least 1000 words");
`prompt_suffix=DETAIL_SUFFIX` asks for detailed answers in the same spirit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from .data import (
    BadRecord,
    count_images,
    encode_prompt,
    load_image,
    load_llava_records,
    parse_llava_record,
    to_model_inputs,
    tokenizer_of,
)

logger = logging.getLogger(__name__)

__all__ = ["DETAIL_SUFFIX", "record_key", "regenerate_answers"]

#: A suffix asking the target for detailed answers (ViSpec asks for "at least 1000 words").
DETAIL_SUFFIX = "Please answer in detail."

_LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def _image_fingerprint(ref: Any) -> str:
    if isinstance(ref, Image.Image):
        return "sha1:" + hashlib.sha1(ref.tobytes()).hexdigest()
    if isinstance(ref, Mapping) and ref.get("bytes") is not None:
        return "sha1:" + hashlib.sha1(ref["bytes"]).hexdigest()
    if isinstance(ref, Mapping):
        return os.fspath(ref.get("path", ""))
    return os.fspath(ref)


def record_key(record: Mapping[str, Any]) -> str:
    """
    Identity of a record for resuming: its `"id"` when present, else a hash of its images and conversation.

    Args:
        record (`dict`): a LLaVA-format record.

    Returns:
        `str`
    """
    if record.get("id") is not None:
        return str(record["id"])
    refs = record.get("images", record.get("image")) or []
    if not isinstance(refs, Sequence) or isinstance(refs, str):
        refs = [refs]
    canonical = json.dumps(
        {"images": [_image_fingerprint(ref) for ref in refs], "conversations": record.get("conversations")},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()


def _completed_keys(output_path: str) -> set[str]:
    """Ids already written; a torn last line (interrupted run) is dropped from the file."""
    if not os.path.isfile(output_path):
        return set()
    keys, kept, torn = set(), [], 0
    with open(output_path, encoding="utf-8") as handle:
        for line in handle:
            try:
                keys.add(str(json.loads(line)["id"]))
                kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                torn += 1
    if torn:
        logger.warning("%s: dropping %d unreadable line(s) left by an interrupted run", output_path, torn)
        with open(output_path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
    return keys


def _to_llava_value(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join("<image>" if item["type"] == "image" else item["text"] for item in content)


def _with_suffix(message: dict[str, Any], suffix: str) -> dict[str, Any]:
    if isinstance(message["content"], str):
        return {**message, "content": f"{message['content']} {suffix}".strip()}
    content = list(message["content"])
    if content and content[-1]["type"] == "text":
        content[-1] = {"type": "text", "text": f"{content[-1]['text']} {suffix}"}
    else:
        content.append({"type": "text", "text": suffix})
    return {**message, "content": content}


def _portable_images(refs: list[Any], key: str, output_path: str, image_root: str | None) -> list[str]:
    """Image paths relative to the output file; in-memory images are saved next to it."""
    out_dir = os.path.dirname(os.path.abspath(output_path))
    paths = []
    for index, ref in enumerate(refs):
        if isinstance(ref, Mapping) and ref.get("bytes") is None and ref.get("path") is not None:
            ref = ref["path"]
        if isinstance(ref, (str, os.PathLike)):
            path = os.fspath(ref)
            if image_root is not None and not os.path.isabs(path):
                path = os.path.join(os.fspath(image_root), path)
        else:
            image_dir = os.path.splitext(os.path.abspath(output_path))[0] + "_images"
            os.makedirs(image_dir, exist_ok=True)
            path = os.path.join(image_dir, f"{key}_{index}.png")
            load_image(ref).save(path)
        paths.append(os.path.relpath(os.path.abspath(path), out_dir))
    return paths


@torch.no_grad()
def regenerate_answers(
    target: torch.nn.Module,
    processing_class: ProcessorMixin | PreTrainedTokenizerBase,
    data: str | os.PathLike | Sequence[Mapping[str, Any]] | Any,
    output_path: str | os.PathLike,
    *,
    prompt_suffix: str | None = None,
    max_new_tokens: int = 512,
    assistant_model: torch.nn.Module | None = None,
    generation_kwargs: dict[str, Any] | None = None,
    image_root: str | os.PathLike | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> Counter:
    r"""
    Writes a LLaVA-format JSONL dataset whose assistant answers were generated by `target` (ViSpec §4.3).

    Every assistant turn is regenerated in order, each conditioned on the conversation so far *with the regenerated
    earlier answers*. `prompt_suffix` is appended to every user turn before its answer and kept in the output, so the
    written conversation is exactly what the target answered. Records keep their other fields and get an `"id"`
    ([`record_key`]); image paths are written relative to the output file (in-memory images are saved as PNG files in
    `<output stem>_images/`). Records are appended and flushed one by one.

    Args:
        target ([`~transformers.PreTrainedModel`]): the target model.
        processing_class: the target's processor (tokenizer for text-only targets).
        data: a `.json`/`.jsonl` file, records, or a `datasets.Dataset`.
        output_path (`str`): the JSONL file to write.
        prompt_suffix (`str`, *optional*): text appended to user turns, e.g. [`DETAIL_SUFFIX`].
        max_new_tokens (`int`, *optional*, defaults to 512): longest regenerated answer.
        assistant_model (`SpecVLMDraftModel`, *optional*): a draft to speed generation up (output is unchanged).
        generation_kwargs (`dict`, *optional*): more `generate` arguments (default: greedy, `do_sample=False`).
        image_root (`str`, *optional*): directory of relative image paths of in-memory records.
        resume (`bool`, *optional*, defaults to `True`): skip records whose id is already in `output_path` (else the
            file is overwritten).
        show_progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.

    Returns:
        `collections.Counter`: `written`, `already_done`, and skipped records by reason (see `SKIP_REASONS`; an empty
        generated answer counts as `no_assistant_turn`).
    """
    output_path = os.fspath(output_path)
    counts: Counter = Counter()
    records = load_llava_records(data, skipped=counts) if isinstance(data, (str, os.PathLike)) else data
    text_only = not isinstance(processing_class, ProcessorMixin)
    tokenizer = tokenizer_of(processing_class)
    generation = {"do_sample": False, **(generation_kwargs or {}), "max_new_tokens": max_new_tokens}
    if assistant_model is not None:
        generation["assistant_model"] = assistant_model
    parameter = next(target.parameters())
    done = _completed_keys(output_path) if resume else set()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "a" if resume else "w", encoding="utf-8") as handle:
        for record in tqdm(records, desc="Regenerating answers", disable=not show_progress):
            try:
                if not isinstance(record, Mapping):
                    raise BadRecord("malformed", f"a record must be a JSON object, got {type(record).__name__}")
                key = record_key(record)
                if key in done:
                    counts["already_done"] += 1
                    continue
                conversation = parse_llava_record(record, text_only=text_only)
                images = [load_image(ref, image_root) for ref in conversation.images]
                history: list[dict[str, Any]] = []
                for message in conversation.messages:
                    if message["role"] == "user" and prompt_suffix:
                        message = _with_suffix(message, prompt_suffix)
                    elif message["role"] == "assistant":
                        prompt = encode_prompt(processing_class, history, images[: count_images(history)])
                        prompt_length = prompt["input_ids"].shape[1]
                        output = target.generate(
                            **to_model_inputs(prompt, parameter.device, parameter.dtype), **generation
                        )
                        sequences = output.sequences if hasattr(output, "sequences") else output
                        answer = tokenizer.decode(sequences[0, prompt_length:], skip_special_tokens=True).strip()
                        if not answer:
                            raise BadRecord("no_assistant_turn", "the target generated an empty answer")
                        message = {
                            "role": "assistant",
                            "content": answer if text_only else [{"type": "text", "text": answer}],
                        }
                    history.append(message)
            except BadRecord as bad:
                counts[bad.reason] += 1
                logger.debug("skipping record: %s", bad)
                continue
            out = {k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations")}
            out["id"] = key
            if conversation.images:
                out["images"] = _portable_images(conversation.images, key, output_path, image_root)
            out["conversations"] = [
                {"from": _LLAVA_ROLES[message["role"]], "value": _to_llava_value(message["content"])}
                for message in history
            ]
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            handle.flush()
            done.add(key)
            counts["written"] += 1
    logger.info("Self-distillation: %s", dict(counts))
    return counts
