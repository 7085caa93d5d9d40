"""The README's main command (`specvlm demo`) and the `specvlm` dispatcher."""

from __future__ import annotations

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
