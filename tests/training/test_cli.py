"""`specvlm train` (`specvlm_hf.training.cli`, also `examples/train_draft.py`) end to end on the tiny target."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import specvlm_hf.cli
from specvlm_hf.errors import UserError, UserFileNotFoundError, UserValueError
from specvlm_hf.training import OnlineDistillationTrainer, cli

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
    with pytest.raises(UserValueError, match="pass --tiny llava, or both --target and --data"):
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
    (regenerated,) = (tmp_path / "draft").glob("self_distilled-*.jsonl")
    assert trainer.train_dataset.source == str(regenerated)
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


def _run(argv: list[str]) -> OnlineDistillationTrainer:
    return cli.train(*cli.make_parser().parse_args_into_dataclasses(args=argv))


def test_regenerated_data_is_keyed_to_its_input(tmp_path):
    """Issue #12, item 5: a second --data trains on its own answers only; rerunning the same input resumes."""
    regenerate = "--regenerate_answers --regenerate_max_new_tokens 3"
    first = _run(_argv(tmp_path, f"{regenerate} --tiny_records 10"))
    (first_file,) = (tmp_path / "draft").glob("self_distilled-*.jsonl")
    first_rows = first_file.read_text().splitlines()
    assert first.train_dataset.num_records == len(first_rows)

    second = _run(_argv(tmp_path, f"{regenerate} --tiny_records 17 --overwrite_output_dir"))
    files = sorted((tmp_path / "draft").glob("self_distilled-*.jsonl"))
    assert len(files) == 2 and first_file in files
    (second_file,) = [path for path in files if path != first_file]
    assert second.train_dataset.source == str(second_file)
    assert second.train_dataset.num_records == len(second_file.read_text().splitlines()) < 17
    assert first_file.read_text().splitlines() == first_rows  # untouched
    meta = json.loads(second_file.with_name(second_file.stem + ".meta.json").read_text())
    assert second_file.name == f"self_distilled-{meta['key']}.jsonl" and meta["settings"]["max_new_tokens"] == 3

    again = _run(_argv(tmp_path, f"{regenerate} --tiny_records 10 --overwrite_output_dir"))
    assert again.train_dataset.source == str(first_file)
    assert first_file.read_text().splitlines() == first_rows  # resumed: nothing regenerated or appended


def test_resume_and_refusal_to_overwrite_a_trained_output_dir(tmp_path, monkeypatch, capsys):
    """Issue #12, item 8."""
    out = tmp_path / "draft"
    checkpoints = "--save_strategy steps --save_steps 1"
    first = _run(_argv(tmp_path, checkpoints))
    assert first.state.global_step == 2 and {"checkpoint-1", "checkpoint-2"} <= set(os.listdir(out))
    model = (out / "model.safetensors").read_bytes()

    # a rerun without --resume_from_checkpoint / --overwrite_output_dir is refused, before anything is loaded
    with pytest.raises(UserValueError, match="already holds a trained draft .* checkpoint-2") as refused:
        cli.main(_argv(tmp_path))
    assert "--resume_from_checkpoint" in str(refused.value) and "--overwrite_output_dir" in str(refused.value)
    capsys.readouterr()
    assert specvlm_hf.cli.main(["train", *_argv(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == model

    resumed_from = []
    original = OnlineDistillationTrainer.train

    def spy(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(OnlineDistillationTrainer, "train", spy)
    # the flag alone, and `True`, resume the latest checkpoint (as transformers documents it)
    resumed = _run(_argv(tmp_path, f"{checkpoints} --max_steps 3 --resume_from_checkpoint"))
    assert resumed_from == [str(out / "checkpoint-2")] and resumed.state.global_step == 3
    resumed = _run(_argv(tmp_path, "--max_steps 4 --resume_from_checkpoint True"))
    assert resumed_from[-1] == str(out / "checkpoint-3") and resumed.state.global_step == 4
    resumed = _run(_argv(tmp_path, f"--max_steps 3 --resume_from_checkpoint {out / 'checkpoint-1'}"))
    assert resumed_from[-1] == str(out / "checkpoint-1") and resumed.state.global_step == 3

    # --overwrite_output_dir trains from scratch and deletes the old run's checkpoints
    scratch = _run(_argv(tmp_path, "--max_steps 1 --overwrite_output_dir"))
    assert resumed_from[-1] is None and scratch.state.global_step == 1
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    assert (out / "model.safetensors").read_bytes() != model


def test_resume_errors_are_user_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserFileNotFoundError, match="no checkpoint-\\* folder in"):
        cli.resolve_checkpoint("True", str(empty))
    with pytest.raises(UserFileNotFoundError, match="no such checkpoint folder"):
        cli.resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(empty))
    with pytest.raises(UserValueError, match="not a Trainer checkpoint"):
        cli.resolve_checkpoint(str(empty), str(tmp_path))
    assert cli.resolve_checkpoint(None, str(empty)) is None and cli.resolve_checkpoint("false", str(empty)) is None
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserValueError, match="has no checkpoint-\\* folder to resume from.*--overwrite_output_dir"):
        cli.check_output_dir(str(empty), resuming=False, overwrite=False)
    with pytest.raises(UserValueError, match="contradict"):
        cli.check_output_dir(str(empty), resuming=True, overwrite=True)
    cli.check_output_dir(str(empty), resuming=False, overwrite=True)


def test_missing_paths_and_bad_flags_are_one_line_user_errors(tmp_path, capsys, monkeypatch):
    """Issue #12, item 9: nothing is loaded before the flags and paths are checked."""
    data = tmp_path / "train.jsonl"
    data.write_text("")
    out = ["--output_dir", str(tmp_path / "out")]
    cases = [
        (["--target", str(tmp_path / "no-such-model"), "--data", str(data)], UserFileNotFoundError,
         "the local folder does not exist"),
        (["--target", "./missing", "--data", str(data)], UserFileNotFoundError, "the local folder does not exist"),
        (["--target", "some/vlm", "--data", str(tmp_path / "missing.jsonl")], UserFileNotFoundError,
         "--data .*missing.jsonl: no such file"),
        (["--target", "some/vlm", "--data", str(data), "--eval_data", str(tmp_path)], UserValueError, "is a folder"),
        (["--target", "some/vlm", "--data", str(data), "--do_eval"], UserValueError, "needs --eval_data"),
        (["--tiny", "llava", "--data", str(data)], UserValueError, "--tiny makes its own"),
        (["--tiny", "llava", "--prompt_suffix", "x"], UserValueError, "only used with --regenerate_answers"),
        (["--tiny", "llava", "--target_layer_ids", "1,a"], UserValueError, "comma-separated integers"),
        (["--tiny", "llava", "--num_draft_layers", "0"], UserValueError, "--num_draft_layers must be >= 1"),
        (["--tiny", "llava", "--lambda_logit", "-1"], UserValueError, "lambda_logit and lambda_feat must be >= 0"),
        (["--tiny", "llava", "--load_best_model_at_end", "--eval_strategy", "steps", "--save_strategy", "epoch"],
         UserValueError, "invalid flags: --load_best_model_at_end requires the save and eval strategy to match"),
        (["--tiny", "llava", "--lr_scheduler_type", "nonsense"], UserValueError, "invalid choice: 'nonsense'"),
        (["--tiny", "llava", "--no_such_flag", "1"], UserValueError, "not used by the HfArgumentParser"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            cli.main(argv + out)
        assert specvlm_hf.cli.main(["train", *argv, *out]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("specvlm train: error: "), lines

    # a Hub id that cannot be loaded (offline, unknown, not a model) is a user error too, not a traceback
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them.")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", unreachable)
    with pytest.raises(UserError, match="--target some/vlm: cannot load it: We couldn't connect .* find them"):
        cli.main(["--target", "some/vlm", "--data", str(data), *out])
