"""Tiny saved models and a prompts file for the `specvlm bench` tests (built once per session, no Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from specvlm_hf import ElasticCompressorConfig, SpecVLMDraftModel
from specvlm_hf.testing.tiny_models import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor


def bench_args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`specvlm bench` arguments for the tiny saved target and draft (fp32, 6 new tokens, no progress bar)."""
    return [
        "bench", "--target", str(assets["target"]), "--draft", str(assets["draft"]),
        "--prompts", str(assets["prompts"]), "--dtype", "float32", "--max-new-tokens", "6", "--out", str(out),
        "--no-progress", *extra,
    ]


def user_error_line(argv: list[str], capsys, after_loading: bool = False, command: str = "bench") -> str:
    """
    Runs `specvlm ARGV` through the dispatcher; asserts exit status 2 and one error line on stderr (no traceback);
    returns the line. Before any model loads it is the only line; `after_loading`, it is the last one (after
    transformers' loading bars).
    """
    from specvlm_hf.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if not after_loading:
        assert len(lines) == 1, lines
    assert lines[-1].startswith(f"specvlm {command}: error: ") and not any("Traceback" in line for line in lines)
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if `specvlm bench` gets as far as loading a model (or measuring)."""
    from specvlm_hf.bench import cli as bench_cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("load_target", "load_draft", "load_assistant", "_load_pocket", "_measure"):
        monkeypatch.setattr(bench_cli, name, refuse, raising=False)  # (`_measure` is private, may be renamed)


def write_prompts(folder: Path) -> Path:
    """Three prompts: one image, text only (no max_new_tokens), two images; images next to the file."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(folder / "blue.png")
    rows = [
        {"images": ["red.png"], "prompt": "what color is the image ?", "max_new_tokens": 10},
        {"prompt": "describe a cat"},
        {"images": ["blue.png", "red.png"], "prompt": "compare the two images", "max_new_tokens": 8},
    ]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bench_assets(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny LLaVA target (+ processor), a random draft, a draft with a compressor, a draft for another target
    (vocabulary 128) and a prompts file."""
    root = tmp_path_factory.mktemp("bench_assets")
    target = build_tiny_target("llava")
    target.save_pretrained(root / "target")
    build_tiny_processor().save_pretrained(root / "target")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        SpecVLMDraftModel.from_target(target).save_pretrained(root / "draft")
        SpecVLMDraftModel.from_target(
            target, compressor_config=ElasticCompressorConfig(mode="select")
        ).save_pretrained(root / "compressor_draft")
        SpecVLMDraftModel.from_target(build_tiny_target("llava", vocab_size=128)).save_pretrained(root / "other_draft")
    return {
        "root": root,
        "target": root / "target",
        "draft": root / "draft",
        "compressor_draft": root / "compressor_draft",
        "other_draft": root / "other_draft",
        "prompts": write_prompts(root),
    }
