"""The JSONL prompts format of `specvlm bench`: loading, validation errors, rendering into model inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specvlm_hf.bench.prompts import load_prompts, render_batch
from specvlm_hf.errors import UserError, UserFileNotFoundError, UserValueError
from specvlm_hf.testing.tiny_processors import (
    build_tiny_processor,
    build_tiny_tokenizer,
)

from .conftest import write_prompts


def test_load_resolves_relative_images_and_defaults(tmp_path):
    path = write_prompts(tmp_path)
    prompts = load_prompts(path, default_max_new_tokens=7)
    assert [p.prompt for p in prompts] == ["what color is the image ?", "describe a cat", "compare the two images"]
    assert prompts[0].images == ((tmp_path / "red.png").resolve(),)
    assert prompts[1].images == ()  # missing `images` = text only
    assert prompts[2].images == ((tmp_path / "blue.png").resolve(), (tmp_path / "red.png").resolve())
    assert [p.max_new_tokens for p in prompts] == [10, 7, 8]  # optional max_new_tokens falls back to the default
    assert prompts[1].source == f"{path}:2"


def test_load_accepts_empty_images_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"images": [], "prompt": "hello"}\n\n')
    (prompt,) = load_prompts(path)
    assert prompt.images == () and prompt.max_new_tokens == 128


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"images": []}', "`prompt` must be a non-empty string"),
        ('{"prompt": "  "}', "`prompt` must be a non-empty string"),
        ('{"prompt": "x", "image": "a.png"}', "unknown keys ['image']"),
        ('{"prompt": "x", "images": "a.png"}', "`images` must be a list"),
        ('{"prompt": "x", "max_new_tokens": 0}', "`max_new_tokens` must be a positive integer"),
        ('{"prompt": "x", "max_new_tokens": "12"}', "`max_new_tokens` must be a positive integer"),
        ('{"prompt": "x", "images": ["nope.png"]}', "missing image files"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    with pytest.raises(UserError) as error:  # printed by the CLI as one line, no traceback
        load_prompts(path)
    assert f"{path}:2" in str(error.value) and message in str(error.value)
    # a missing image is a FileNotFoundError, every other bad line a ValueError
    expected = UserFileNotFoundError if "missing image" in message else UserValueError
    assert isinstance(error.value, expected)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(UserFileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "absent.jsonl")
    with pytest.raises(UserValueError, match="is not a file"):
        load_prompts(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserValueError, match="holds no prompt"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserValueError, match="not a UTF-8 text file"):
        load_prompts(tmp_path / "binary.jsonl")


def test_unreadable_image_names_the_prompt(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"images": ["fake.png"], "prompt": "what is it?"}) + "\n")
    prompts = load_prompts(path)
    with pytest.raises(UserValueError, match=rf"{path}:1: cannot read image .*fake.png"):
        render_batch(build_tiny_processor(), prompts, "cpu")


def test_render_batch_left_pads_and_expands_images(tmp_path):
    processor = build_tiny_processor()
    prompts = load_prompts(write_prompts(tmp_path))
    single = render_batch(processor, prompts[:1], "cpu", torch.float16)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((single["input_ids"] == image_id).sum()) == 9  # one 24x24 image -> 9 placeholders
    assert single["pixel_values"].dtype == torch.float16
    batch = render_batch(processor, prompts[1:3], "cpu")
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2  # two images, second row
    assert int(batch["attention_mask"][0, 0]) == 0 and int(batch["attention_mask"][1, 0]) == 1  # left padding
    assert processor.tokenizer.padding_side == "right"  # restored


def test_render_text_only_target_rejects_images(tmp_path):
    tokenizer = build_tiny_tokenizer()
    prompts = load_prompts(write_prompts(tmp_path))
    inputs = render_batch(tokenizer, prompts[1:2], "cpu")
    assert inputs["input_ids"].shape[0] == 1
    with pytest.raises(UserValueError, match="the target is text-only"):
        render_batch(tokenizer, prompts[:1], "cpu")


def test_the_example_text_only_prompts_load():
    """`examples/bench_prompts/text_only.jsonl` (the Gemma-3-270M rows): six text prompts, one past a 512-token window."""
    path = Path(__file__).resolve().parents[2] / "examples" / "bench_prompts" / "text_only.jsonl"
    prompts = load_prompts(path)
    assert len(prompts) == 6 and all(not prompt.images for prompt in prompts)
    assert max(len(prompt.prompt.split()) for prompt in prompts) > 512  # words, so > 512 tokens for any tokenizer
