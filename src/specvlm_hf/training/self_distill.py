# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Self-distillation data (ViSpec §4.3): regenerate the assistant answers of a LLaVA-format dataset with the target.

A draft learns the distribution it will meet at inference best from the target's own outputs: dataset answers are
often short and written by someone else. ViSpec regenerates long answers (its prompts ask for "at least 1000 words");
`prompt_suffix=DETAIL_SUFFIX` asks for detailed answers in the same spirit.

Regenerated data is keyed to what produced it ([`regeneration_fingerprint`]: the input data, the target and the
generation settings). The key is stored next to the output (`<output stem>.meta.json`), so a run resumes only its own
output and refuses to mix answers of another input into it; `specvlm train --regenerate_answers` writes one file per
key (`<output_dir>/self_distilled-<key>.jsonl`).
"""

from __future__ import annotations

import functools
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

from ..errors import UserValueError
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

__all__ = ["DETAIL_SUFFIX", "record_key", "regenerate_answers", "regeneration_fingerprint", "regeneration_meta_path"]

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


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: the cache key of one file version
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_fingerprint(data: Any) -> dict[str, Any]:
    if isinstance(data, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(data))
        stat = os.stat(path)
        return {"file": os.path.basename(path), "sha256": _file_sha256(path, stat.st_size, stat.st_mtime_ns)}
    if getattr(data, "_fingerprint", None) is not None:  # a `datasets.Dataset`
        return {"datasets_fingerprint": data._fingerprint, "records": len(data)}
    digest = hashlib.sha256()
    count = 0
    for record in data:
        key = record_key(record) if isinstance(record, Mapping) else repr(record)
        digest.update(key.encode("utf-8") + b"\n")
        count += 1
    return {"records_sha256": digest.hexdigest(), "records": count}


def _target_fingerprint(target: torch.nn.Module) -> dict[str, Any]:
    """The target's identity: architecture, dtype and a hash of the first 256 values of every weight."""
    config = getattr(target, "config", None)
    digest = hashlib.sha256()
    dtypes = set()
    for name, parameter in target.named_parameters():
        dtypes.add(str(parameter.dtype))
        digest.update(name.encode("utf-8"))
        if parameter.device.type != "meta":
            digest.update(parameter.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", type(target).__name__),
        "dtypes": sorted(dtypes),
        "weights_sha256": digest.hexdigest(),
    }


def regeneration_fingerprint(
    target: torch.nn.Module,
    processing_class: ProcessorMixin | PreTrainedTokenizerBase,
    data: str | os.PathLike | Sequence[Mapping[str, Any]] | Any,
    *,
    prompt_suffix: str | None = None,
    max_new_tokens: int = 512,
    generation_kwargs: dict[str, Any] | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """
    What determines the output of [`regenerate_answers`]: the input data (the file's SHA-256, not its path, or the
    records' [`record_key`]s), the target (architecture, dtype, a hash of its weights), its chat template and the
    generation settings. An `assistant_model` is left out: it does not change the output.

    Args:
        target, processing_class, data, prompt_suffix, max_new_tokens, generation_kwargs, image_root: as for
            [`regenerate_answers`].

    Returns:
        `dict`: `"key"` (16 hex digits, a hash of all the rest, e.g. for a file name), `"data"`, `"target"` and
        `"settings"`. `target["name_or_path"]` is informative and not part of the key (a moved model folder resumes).
    """
    target_part = _target_fingerprint(target)
    chat_template = getattr(processing_class, "chat_template", None)
    settings = {
        "prompt_suffix": prompt_suffix,
        "max_new_tokens": max_new_tokens,
        "generation_kwargs": {k: v for k, v in (generation_kwargs or {}).items() if k != "assistant_model"},
        "image_root": os.path.abspath(os.fspath(image_root)) if image_root is not None else None,
        "chat_template_sha256": hashlib.sha256(str(chat_template).encode("utf-8")).hexdigest(),
    }
    fingerprint = {
        "data": _data_fingerprint(data),
        "target": target_part,
        "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
    }
    keyed = {part: _keyed(value, part) for part, value in fingerprint.items()}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return {"key": key, **fingerprint}


def _keyed(part: Any, kind: str) -> Any:
    """The part of a fingerprint entry that enters the key (names of files and folders do not)."""
    if not isinstance(part, dict):
        return part
    drop = {"target": "name_or_path", "data": "file"}.get(kind)
    return {k: v for k, v in part.items() if k != drop}


def regeneration_meta_path(output_path: str | os.PathLike) -> str:
    """The fingerprint file stored with a regenerated dataset: `<output stem>.meta.json`."""
    return os.path.splitext(os.fspath(output_path))[0] + ".meta.json"


def _check_resumable(output_path: str, fingerprint: dict[str, Any]) -> None:
    """Refuses to resume into `output_path` when it holds answers generated from another input."""
    if not os.path.isfile(output_path) or os.path.getsize(output_path) == 0:
        return
    meta_path = regeneration_meta_path(output_path)
    advice = (
        "write to another output file (specvlm train: another --output_dir), or pass resume=False to regenerate "
        "it from scratch"
    )
    if not os.path.isfile(meta_path):
        raise UserValueError(
            f"{output_path} already exists without {os.path.basename(meta_path)}, which would say which input data, "
            f"target and settings its answers come from, so it cannot be resumed safely: {advice}."
        )
    with open(meta_path, encoding="utf-8") as handle:
        stored = json.load(handle)
    if stored.get("key") == fingerprint["key"]:
        return
    differs = [
        part
        for part in ("data", "target", "settings")
        if _keyed(stored.get(part), part) != _keyed(fingerprint[part], part)
    ]
    raise UserValueError(
        f"{output_path} holds answers regenerated from another input (different {', '.join(differs) or 'key'}: "
        f"key {stored.get('key')} there, {fingerprint['key']} now); records of another input are never mixed in: "
        f"{advice}."
    )


def _write_meta(output_path: str, fingerprint: dict[str, Any]) -> None:
    meta_path = regeneration_meta_path(output_path)
    temporary = meta_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(fingerprint, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, meta_path)


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

    The output is keyed to its input: [`regeneration_fingerprint`] (data, target, settings) is written to
    `<output stem>.meta.json`, and resuming into an output made from another input (or without that file) raises
    instead of mixing the two.

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
            file is overwritten). Resuming requires the output to come from the same input (same fingerprint).
        show_progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.

    Returns:
        `collections.Counter`: `written`, `already_done`, and skipped records by reason (see `SKIP_REASONS`; an empty
        generated answer counts as `no_assistant_turn`).

    Raises:
        [`~specvlm_hf.errors.UserValueError`] when `resume=True` and `output_path` holds answers of another input.
    """
    output_path = os.fspath(output_path)
    counts: Counter = Counter()
    records = load_llava_records(data, skipped=counts) if isinstance(data, (str, os.PathLike)) else data
    fingerprint = regeneration_fingerprint(
        target,
        processing_class,
        data,
        prompt_suffix=prompt_suffix,
        max_new_tokens=max_new_tokens,
        generation_kwargs=generation_kwargs,
        image_root=image_root,
    )
    if resume:
        _check_resumable(output_path, fingerprint)
    text_only = not isinstance(processing_class, ProcessorMixin)
    tokenizer = tokenizer_of(processing_class)
    generation = {"do_sample": False, **(generation_kwargs or {}), "max_new_tokens": max_new_tokens}
    if assistant_model is not None:
        generation["assistant_model"] = assistant_model
    parameter = next(target.parameters())
    done = _completed_keys(output_path) if resume else set()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    _write_meta(output_path, fingerprint)
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
