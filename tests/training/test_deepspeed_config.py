"""`examples/deepspeed_zero2.json`: ZeRO-2, and every `"auto"` entry filled from `OnlineDistillationConfig` by
transformers' own DeepSpeed integration (run here without DeepSpeed installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import specvlm_hf
from specvlm_hf.testing import build_tiny_target
from specvlm_hf.training import OnlineDistillationConfig

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "deepspeed_zero2.json"


def _autos(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def test_the_zero2_config_is_filled_from_the_training_arguments(tmp_path):
    accelerate_deepspeed = pytest.importorskip("accelerate.utils.deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = json.loads(CONFIG.read_text())
    assert config["zero_optimization"]["stage"] == 2
    expected_autos = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer.params.betas"}
    assert set(_autos(config)) >= expected_autos
    # transformers' filling code, on accelerate's config holder (HfTrainerDeepSpeedConfig's own base needs deepspeed)
    methods = {
        name: value
        for name, value in vars(HfTrainerDeepSpeedConfig).items()
        if name not in ("__init__", "__dict__", "__weakref__", "__module__", "__doc__")
    }
    filler = type("Filler", (accelerate_deepspeed.HfDeepSpeedConfig,), methods)(config)
    filler.mismatches, filler._dtype = [], None
    args = OnlineDistillationConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=8,
        ttt_steps=3,
    )
    filler.trainer_config_process(args)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(build_tiny_target("llava"))
    filler.trainer_config_finalize(args, draft, num_training_steps=100)  # raises on any mismatch
    filled = filler.config
    assert not list(_autos(filled))
    assert filled["optimizer"]["params"]["betas"] == [0.9, 0.95] and filled["optimizer"]["params"]["lr"] == 8e-5
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (4, 8)
    assert filled["zero_optimization"]["reduce_bucket_size"] == draft.config.hidden_size**2
