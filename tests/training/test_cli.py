"""`specvlm train` (`specvlm_hf.training.cli`, also `examples/train_draft.py`) end to end on the tiny target."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from specvlm_hf.training import cli

from .training_helpers import HAS_LOOP

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_draft.py"


def _argv(tmp_path, extra: str = "") -> list[str]:
    common = (
        f"--tiny llava --tiny_records 10 --output_dir {tmp_path / 'draft'} --max_steps 2 "
        "--per_device_train_batch_size 4 --report_to none --disable_tqdm true --dataloader_pin_memory false "
        "--use_cpu true --save_strategy no"
    )
    return f"{common} {extra}".split()


def test_parser_exposes_script_and_training_flags():
    script_args, config = cli.make_parser().parse_args_into_dataclasses(
        args="--target some/vlm --data train.jsonl --lambda_logit 0.2 --output_dir x --draft_vocab_size 8192".split()
    )
    assert (script_args.target, script_args.data, script_args.draft_vocab_size) == ("some/vlm", "train.jsonl", 8192)
    assert config.lambda_logit == 0.2 and config.remove_unused_columns is False
    with pytest.raises(SystemExit):
        cli.main(["--output_dir", "x"])  # neither --tiny nor --target/--data


def test_main_trains_saves_and_returns_an_exit_status(tmp_path):
    extra = "--draft_vocab_size 48 --target_layer_ids 1,-1"
    if HAS_LOOP:
        extra += " --do_eval --eval_acceptance_prompts 1 --eval_acceptance_max_new_tokens 4"
    assert cli.main(_argv(tmp_path, extra)) == 0
    files = set(os.listdir(tmp_path / "draft"))
    assert {"README.md", "config.json", "model.safetensors", "training_args.bin"} <= files
    card = (tmp_path / "draft" / "README.md").read_text()
    assert "reduced: 48 of 96 target tokens" in card and "`hidden_states[1, -1]`" in card
    assert "| global_steps | 2 |" in card
    if HAS_LOOP:
        assert "**Mean acceptance length:" in card


def test_train_with_regenerated_answers(tmp_path):
    parser = cli.make_parser()
    script_args, config = parser.parse_args_into_dataclasses(
        args=_argv(tmp_path, "--regenerate_answers --regenerate_max_new_tokens 4 --num_draft_layers 2")
    )
    trainer = cli.train(script_args, config)
    regenerated = tmp_path / "draft" / "self_distilled.jsonl"
    assert regenerated.is_file() and trainer.train_dataset.source == str(regenerated)
    assert trainer.model.config.num_hidden_layers == 2 and trainer.state.global_step == 2


def test_example_script_is_the_cli():
    spec = importlib.util.spec_from_file_location("train_draft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert (module.make_parser, module.main, module.train) == (cli.make_parser, cli.main, cli.train)
    assert EXAMPLE.read_text().startswith("# /// script\n")


def test_training_package_exports_resolve():
    import specvlm_hf.training as training

    assert set(training.__all__) == set(training._EXPORTS)
    for name in training.__all__:
        assert getattr(training, name) is not None
