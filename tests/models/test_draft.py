"""The SpecVLM draft: construction from every target family, config checks, reduced vocabulary, save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, __version__
from specvlm_hf.testing.tiny_models import FAMILIES, build_tiny_target, make_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_from_target_shapes_and_provenance(family):
    target = build_tiny_target(family)
    draft = SpecVLMDraftModel.from_target(target, tree_total_tokens=12)
    text = target.config.get_text_config()
    assert draft.config.hidden_size == text.hidden_size
    assert draft.config.vocab_size == text.vocab_size
    assert draft.config.target_model_type == target.config.model_type
    assert draft.config.specvlm_hf_version == __version__
    assert draft.config.tree_total_tokens == 12
    assert draft.compatibility_problems(target) == []
    # the target's embedding and head are shared at run time, never stored in the draft
    names = set(draft.state_dict())
    assert not any("embed" in n or n.startswith("lm_head") for n in names)
    n_params = sum(p.numel() for p in draft.parameters())
    assert n_params < sum(p.numel() for p in target.parameters())


def test_config_validation_messages():
    with pytest.raises(Exception, match="tree_depth must be >= 1"):
        SpecVLMDraftConfig(tree_depth=0)
    with pytest.raises(Exception, match="draft_vocab_size"):
        SpecVLMDraftConfig(vocab_size=10, draft_vocab_size=20)
    with pytest.raises(Exception):
        SpecVLMDraftConfig(tree_top_k="eight")


def test_multi_layer_features_project_to_hidden():
    target = build_tiny_target("llama")
    draft = SpecVLMDraftModel.from_target(target, target_layer_ids=[1, -1])
    assert draft.feature_proj is not None and draft.feature_proj.in_features == 2 * 64
    assert draft.feature_layer_ids == [0, 1, -1]
    inputs = make_inputs("llama", target, with_image=False)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert out.tolist() == reference.tolist()


def test_reduced_draft_vocabulary_is_lossless_and_maps_ids():
    target = build_tiny_target("llava")
    draft = SpecVLMDraftModel.from_target(target)
    keep = torch.arange(3, 60)
    draft.set_draft_vocab(keep, target.get_output_embeddings().weight)
    assert draft.config.draft_vocab_size == keep.numel()
    hidden = torch.randn(2, 64)
    logits = draft.compute_logits(hidden)
    assert logits.shape == (2, keep.numel())
    torch.testing.assert_close(logits, target.get_output_embeddings()(hidden)[:, keep])  # init = the target's rows
    assert draft.draft_to_target(torch.tensor([0, 5])).tolist() == [3, 8]
    inputs = make_inputs("llava", target, with_image=True)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert out.tolist() == reference.tolist()


def _save(tmp_path, draft):
    """Saves `draft` plus `reference.pt`: a fixed input and the draft's output on it, for the reloaded copy to match."""
    path = tmp_path / "draft"
    draft.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    hidden = draft.config.hidden_size
    inputs = {
        "inputs_embeds": torch.randn(1, 7, hidden, generator=generator),
        "target_hidden_states": torch.randn(1, 7, draft.config.target_hidden_size * len(draft.config.target_layer_ids),
                                            generator=generator),
        "position_ids": torch.arange(3, 10)[None],  # positions matter: a broken rotary embedding changes the output
    }
    with torch.no_grad():
        output = draft(**inputs).last_hidden_state
    torch.save({"inputs": inputs, "output": output}, path / "reference.pt")
    return path


def test_save_load_round_trip_in_process(tmp_path):
    target = build_tiny_target("qwen2_vl")
    draft = SpecVLMDraftModel.from_target(target)
    draft.set_draft_vocab(torch.arange(10, 50), target.get_output_embeddings().weight)
    path = _save(tmp_path, draft)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "specvlm_draft"
    assert config["auto_map"]["AutoModel"] == "modeling_specvlm_draft.SpecVLMDraftModel"
    assert isinstance(AutoConfig.from_pretrained(path), SpecVLMDraftConfig)
    loaded = AutoModel.from_pretrained(path)
    assert type(loaded) is SpecVLMDraftModel
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # non-persistent buffers (rotary inv_freq) are not in the checkpoint: loading must recompute them
    for (name, a), (_, b) in zip(draft.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    reference = torch.load(path / "reference.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**reference["inputs"]).last_hidden_state, reference["output"])


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    {setup}
    from transformers import AutoModel
    from safetensors.torch import load_file
    draft = AutoModel.from_pretrained(sys.argv[1], {kwargs})
    saved = load_file(sys.argv[1] + "/model.safetensors")
    state = draft.state_dict()
    assert set(saved) == set(state), (set(saved) ^ set(state))
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    reference = torch.load(sys.argv[1] + "/reference.pt")
    with torch.no_grad():
        torch.testing.assert_close(draft(**reference["inputs"]).last_hidden_state, reference["output"])
    print("OK", type(draft).__module__, bool(getattr(type(draft), "_is_specvlm_draft", False)))
    """
)


def _run_fresh(path, setup: str, kwargs: str, env_extra: dict | None = None) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    code = FRESH_PROCESS.format(setup=setup, kwargs=kwargs)
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, cwd=path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_round_trip_in_a_fresh_process_without_remote_code(tmp_path):
    path = _save(tmp_path, SpecVLMDraftModel.from_target(build_tiny_target("llama")))
    out = _run_fresh(path, "import specvlm_hf", "")
    assert "OK specvlm_hf.models.modeling_specvlm_draft True" in out


def test_round_trip_through_auto_map_remote_code(tmp_path):
    """Users without the library load the same weights through `trust_remote_code=True` (classes are distinct)."""
    path = _save(tmp_path, SpecVLMDraftModel.from_target(build_tiny_target("llama")))
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "specvlm_hf.py").write_text("raise ImportError('specvlm_hf hidden for this test')\n")
    out = _run_fresh(path, f"sys.path.insert(0, {str(blocker)!r})", "trust_remote_code=True")
    assert "OK transformers_modules" in out and out.strip().endswith("True")
