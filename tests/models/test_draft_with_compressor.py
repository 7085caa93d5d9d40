"""A SpecVLM draft carrying an elastic visual compressor: construction, widths, checkpoints and remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel
from transformers.cache_utils import DynamicCache

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.models import ElasticCompressorConfig, ElasticVisualCompressor
from specvlm_hf.models.modeling_specvlm_draft import compressor_config_to_dict
from specvlm_hf.testing.tiny_models import build_tiny_target

HIDDEN = 64  # text width of every tiny target
COMPRESSOR_FILES = ("configuration_elastic_compressor.py", "modeling_elastic_compressor.py")


@pytest.fixture(scope="module")
def target():
    return build_tiny_target("llava")


def _compress_inputs() -> dict:
    """One row of 20 prefill pairs whose positions 3..11 pair the tokens of a 3 x 3 image."""
    generator = torch.Generator().manual_seed(7)
    visual = torch.zeros(1, 20, dtype=torch.bool)
    visual[0, 3:12] = True
    return {
        "inputs_embeds": torch.randn(1, 20, HIDDEN, generator=generator),
        "target_hidden_states": torch.randn(1, 20, HIDDEN, generator=generator),
        "visual_mask": visual,
        "grid_sizes": [[(3, 3)]],
    }


def _trained_draft(target, **compressor_fields) -> SpecVLMDraftModel:
    """A draft with a compressor whose weights are moved away from their (structured) initialisation."""
    draft = SpecVLMDraftModel.from_target(target, compressor_config=ElasticCompressorConfig(**compressor_fields))
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return draft.eval()


def test_no_compressor_without_config(target):
    draft = SpecVLMDraftModel.from_target(target)
    assert draft.compressor is None and draft.config.compressor_config is None
    with pytest.raises(ValueError, match="no visual compressor"):
        draft.fuse_and_compress(**_compress_inputs())


@pytest.mark.parametrize("layer_ids", [[-1], [1, -1]])
def test_from_target_takes_widths_from_the_draft(target, layer_ids):
    requested = ElasticCompressorConfig(mode="weighted", weighted_ratio=2)  # built for the default 4096 width
    draft = SpecVLMDraftModel.from_target(target, target_layer_ids=layer_ids, compressor_config=requested)
    config = draft.compressor.config
    assert isinstance(draft.compressor, ElasticVisualCompressor)
    assert (config.hidden_size, config.gate_input_size) == (HIDDEN, HIDDEN * len(layer_ids))
    assert config.resampler_num_heads == 1  # re-derived for the 64-wide draft (4096 gave 32)
    assert (config.mode, config.primitives, config.weighted_ratio) == ("weighted", ["prune", "pool", "conv"], 2)
    assert draft.config.compressor_config == compressor_config_to_dict(config)
    assert set(draft.config.compressor_config) == set(ElasticCompressorConfig.__annotations__)
    features = torch.randn(1, 20, config.gate_input_size)
    out = draft.fuse_and_compress(**{**_compress_inputs(), "target_hidden_states": features})
    assert out.fused.shape == (1, 20 - 9 + 3 * 2, HIDDEN)  # 3 x 3 grid, 1 x 2 windows -> 3 x 2 tokens


def test_explicit_fields_and_dicts_are_kept(target):
    draft = SpecVLMDraftModel.from_target(
        target, compressor_config={"mode": "concat", "primitives": ["pool", "resampler"], "resampler_num_heads": 4}
    )
    config = draft.compressor.config
    assert (config.mode, config.primitives, config.resampler_num_heads) == ("concat", ["pool", "resampler"], 4)
    assert config.hidden_size == HIDDEN


def test_hand_written_draft_config_is_completed():
    config = SpecVLMDraftConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=2, target_hidden_size=48,
        compressor_config={"primitives": ["pool", "text_only"]},
    )
    draft = SpecVLMDraftModel(config)
    assert (draft.compressor.config.hidden_size, draft.compressor.config.gate_input_size) == (32, 48)
    assert config.compressor_config["hidden_size"] == 32 and config.compressor_config["gate_input_size"] == 48


def test_identity_compression_reproduces_the_plain_forward(target):
    draft = _trained_draft(target, primitives=["pool"], pool_ratio=1)  # one-token windows: identity
    inputs = _compress_inputs()
    compressed = draft.fuse_and_compress(**inputs)
    two_steps = draft(fused_inputs=compressed.fused, position_ids=compressed.position_ids)
    direct = draft(inputs_embeds=inputs["inputs_embeds"], target_hidden_states=inputs["target_hidden_states"])
    assert torch.equal(two_steps.last_hidden_state, direct.last_hidden_state)
    with pytest.raises(ValueError, match="fused_inputs"):
        draft(inputs_embeds=inputs["inputs_embeds"])


def test_forward_with_visual_mask_compresses(target):
    draft = _trained_draft(target, mode="concat")
    inputs = _compress_inputs()
    compressed = draft.fuse_and_compress(**inputs)
    out = draft(**inputs)
    assert torch.equal(out.compressor_output.kept_index, compressed.kept_index)
    expected = draft(fused_inputs=compressed.fused, position_ids=compressed.position_ids)
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert out.last_hidden_state.shape[1] == 20 - 9 + (1 + 1 + 3 + 2)  # prune + pool + conv (1 x 3 windows) + queries
    plain = SpecVLMDraftModel.from_target(target)
    assert plain(**inputs).compressor_output is None  # a draft without compressor sees every position
    cache = DynamicCache()
    draft(**{**inputs, "visual_mask": None}, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache must be empty"):
        draft(**inputs, past_key_values=cache, use_cache=True)


def test_training_forward_reaches_the_gate(target):
    # the trainer recipe: one forward with visual_mask, targets gathered at kept_index, token cost on the gate
    draft = _trained_draft(target, mode="select", token_cost=0.1).train()
    inputs = _compress_inputs()
    out = draft(**inputs)
    compressed = out.compressor_output
    targets = torch.randn(1, 20, HIDDEN).gather(1, compressed.kept_index.clamp(min=0)[..., None].expand(-1, -1, HIDDEN))
    valid = compressed.attention_mask.bool()
    loss = (out.last_hidden_state - targets)[valid].pow(2).mean()
    loss = loss + draft.compressor.config.token_cost * compressed.expected_kept_fraction.mean()
    loss.backward()
    assert draft.compressor.gate.fc2.weight.grad.abs().sum() > 0
    assert draft.fc.weight.grad.abs().sum() > 0


def test_save_load_round_trip_is_bit_exact(target, tmp_path):
    draft = _trained_draft(target, mode="select", prune_strategy="saliency_question")
    draft.save_pretrained(tmp_path)
    for name in COMPRESSOR_FILES + ("modeling_specvlm_draft.py", "configuration_specvlm_draft.py"):
        assert (tmp_path / name).is_file(), f"save_pretrained did not copy {name} (auto_map relative import)"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_specvlm_draft.SpecVLMDraftModel"
    assert saved["compressor_config"] == draft.config.compressor_config

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is SpecVLMDraftModel and type(loaded.compressor) is ElasticVisualCompressor
    assert loaded.config.compressor_config == draft.config.compressor_config
    original, reloaded = draft.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and any(key.startswith("compressor.") for key in original)
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    first, second = draft.fuse_and_compress(**_compress_inputs()), loaded.fuse_and_compress(**_compress_inputs())
    assert torch.equal(first.fused, second.fused) and torch.equal(first.choice, second.choice)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "specvlm_hf"))]
    import importlib.util
    assert importlib.util.find_spec("specvlm_hf") is None, "specvlm_hf must not be importable here"
    import torch
    from transformers import AutoModel

    checkpoint, inputs_path, out_path = sys.argv[1:]
    draft = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    out = draft.fuse_and_compress(**torch.load(inputs_path))
    torch.save(
        {
            "module": type(draft.compressor).__module__,
            "state": draft.state_dict(),
            "fused": out.fused,
            "kept_index": out.kept_index,
        },
        out_path,
    )
    """
)


def test_remote_code_loads_without_the_library(target, tmp_path):
    draft = _trained_draft(target, mode="concat")
    checkpoint = tmp_path / "draft"
    draft.save_pretrained(checkpoint)
    inputs = _compress_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")  # the copied code, not the library
    local = draft.state_dict()
    assert remote["state"].keys() == local.keys()
    assert all(torch.equal(remote["state"][key], local[key]) for key in local)
    expected = draft.fuse_and_compress(**inputs)
    assert torch.equal(remote["kept_index"], expected.kept_index)
    # the same weights and code; a multi-threaded CPU GEMM may still round ~1e-7 differently in another process (seen
    # at 2 threads on a 2-core AMD EPYC), so the features are compared to float32 rounding, not bit for bit
    torch.testing.assert_close(remote["fused"], expected.fused.detach(), rtol=1e-5, atol=1e-6)
