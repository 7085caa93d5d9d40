"""Benchmark prompts: the JSONL file format and its rendering into model inputs.

One JSON object per line::

    {"images": ["a.png"], "prompt": "Describe the image.", "max_new_tokens": 128}

`images` (paths relative to the file's folder, possibly empty) and `max_new_tokens` are optional; blank lines are
skipped. Rendering follows the usual VLM recipe: the user turn `[{"type": "image"}, ..., {"type": "text", ...}]` goes
through `processor.apply_chat_template(..., add_generation_prompt=True)`, then
`processor(images=..., text=..., return_tensors="pt")`; text-only targets use their tokenizer's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserFileNotFoundError, UserValueError

__all__ = ["BENCH_DIR", "BENCH_PROMPTS_FILE", "DEFAULT_PROMPTS_PATH", "BenchPrompt", "load_prompts", "render_batch"]

#: The committed held-out benchmark assets (photos, `prompts.jsonl`, `LICENSES.md`), packaged with specvlm-hf.
BENCH_DIR = Path(__file__).resolve().parent.parent / "assets" / "bench"
BENCH_PROMPTS_FILE = "prompts.jsonl"
#: `specvlm bench`'s default `--prompts`: the committed held-out benchmark prompts.
DEFAULT_PROMPTS_PATH = BENCH_DIR / BENCH_PROMPTS_FILE

_KEYS = {"images", "prompt", "max_new_tokens"}


@dataclass(frozen=True)
class BenchPrompt:
    """
    One benchmark prompt.

    Args:
        prompt (`str`): the user's text.
        images (`tuple[Path, ...]`): absolute paths of the images, in the order they appear before the text.
        max_new_tokens (`int`): tokens to generate.
        source (`str`): `file:line` it was read from (for messages and reports).
    """

    prompt: str
    images: tuple[Path, ...]
    max_new_tokens: int
    source: str = ""


def load_prompts(path: str | Path, default_max_new_tokens: int = 128) -> list[BenchPrompt]:
    """
    Reads and validates a benchmark prompts file (JSONL).

    Args:
        path (`str` or `Path`): the file; image paths inside it are relative to its folder (absolute paths are kept).
        default_max_new_tokens (`int`, *optional*, defaults to 128): used for lines without `max_new_tokens`.

    Returns:
        `list[BenchPrompt]`, in file order.

    Raises:
        [`~specvlm_hf.errors.UserFileNotFoundError`] (a `FileNotFoundError`): the file does not exist, or a line names
            an image file that does not exist (the message gives `file:line`).
        [`~specvlm_hf.errors.UserValueError`] (a `ValueError`): the file cannot be read as UTF-8 text, a line is not a
            JSON object with a non-empty `prompt`, has unknown keys or wrong types, or the file holds no prompt; the
            message gives `file:line`.
    """
    path = Path(path)
    if not path.exists():
        raise UserFileNotFoundError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise UserValueError(f"prompts file {path} is not a file")
    if default_max_new_tokens < 1:
        raise UserValueError(f"default_max_new_tokens must be positive, got {default_max_new_tokens}")
    try:
        text_lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserValueError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UserValueError(f"prompts file {path} cannot be read ({error.strerror or error})") from None
    prompts = []
    for number, line in enumerate(text_lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            # a malformed file, reported like every other bad line
            raise UserValueError(f"{where}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
        unknown = set(row) - _KEYS
        if unknown:
            raise UserValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise UserValueError(f"{where}: `prompt` must be a non-empty string")
        images = row.get("images", [])
        if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
            raise UserValueError(f"{where}: `images` must be a list of file names")
        max_new = row.get("max_new_tokens", default_max_new_tokens)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise UserValueError(f"{where}: `max_new_tokens` must be a positive integer, got {max_new!r}")
        resolved = tuple((path.parent / name).resolve() for name in images)
        missing = [str(image) for image in resolved if not image.is_file()]
        if missing:
            raise UserFileNotFoundError(f"{where}: missing image files {missing} (image paths are relative to the "
                                        "prompts file's folder)")
        prompts.append(BenchPrompt(prompt=text, images=resolved, max_new_tokens=max_new, source=where))
    if not prompts:
        raise UserValueError(f"{path} holds no prompt")
    return prompts


def _is_multimodal_processor(processor: Any) -> bool:
    return hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")


def render_batch(
    processor: Any, prompts: list[BenchPrompt], device: torch.device | str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """
    Model inputs for a batch of prompts (left-padded when there are several).

    Args:
        processor: a multimodal processor (with `tokenizer` and `image_processor`) or, for text-only targets, a
            tokenizer.
        prompts (`list[BenchPrompt]`): the batch.
        device (`torch.device` or `str`): where to put the tensors.
        dtype (`torch.dtype`, *optional*): floating-point inputs (pixel values) are cast to it.

    Returns:
        `dict[str, torch.Tensor]` for `model.generate(**inputs)`.

    Raises:
        [`~specvlm_hf.errors.UserValueError`]: a prompt has images but the target is text-only, or an image file
            cannot be read as an image (the message gives the prompt's `file:line`).
    """
    from PIL import Image

    multimodal = _is_multimodal_processor(processor)
    tokenizer = processor.tokenizer if multimodal else processor
    texts, images = [], []
    templated = bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))
    for item in prompts:
        if item.images and not multimodal:
            raise UserValueError(
                f"{item.source}: the prompt has images but the target is text-only (no image processor)"
            )
        if multimodal:
            content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": item.prompt}]
            messages = [{"role": "user", "content": content}]
        else:
            messages = [{"role": "user", "content": item.prompt}]
        if templated:
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = item.prompt
        texts.append(text)
        for image_path in item.images:
            try:
                with Image.open(image_path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, Image.DecompressionBombError) as error:  # PIL's UnidentifiedImageError is an OSError
                raise UserValueError(f"{item.source}: cannot read image {image_path} ({error})") from None
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if multimodal:
            batch = processor(images=images or None, text=texts, return_tensors="pt", padding=len(texts) > 1)
        else:
            # a chat template already writes the special tokens (bos, role markers)
            batch = processor(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = padding_side
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to(device)
    return out
