"""Every unsupported setting raises a clear error instead of silently ignoring the draft or decoding wrongly; other
assistant models and prompt lookup are left untouched."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation import loop
from specvlm_hf.generation.cache_utils import UnsupportedCacheError, check_cache_supported
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs


@pytest.fixture(scope="module")
def llava():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    return target, SpecVLMDraftModel.from_target(target), make_inputs("llava", target, with_image=True)


def test_beam_search_with_a_draft_raises(llava):
    target, draft, inputs = llava
    with pytest.raises(ValueError, match="num_beams=1"):
        target.generate(**inputs, max_new_tokens=4, num_beams=2, assistant_model=draft)


def test_static_cache_raises(llava):
    target, draft, inputs = llava
    with pytest.raises(ValueError, match="cache"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, cache_implementation="static")


def test_no_cache_raises(llava):
    target, draft, inputs = llava
    with pytest.raises(ValueError, match="use_cache"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, use_cache=False)


def test_attention_implementation_without_custom_masks_raises(llava, monkeypatch):
    target, draft, inputs = llava
    # flash-attention kernels are not installable on this CPU machine; pretend the target was loaded with them
    monkeypatch.setattr(target.config, "_attn_implementation_internal", "flash_attention_2")
    with pytest.raises(ValueError, match="sdpa"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft)


def test_linear_attention_and_foreign_caches_are_refused():
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), LinearAttentionLayer()]
    with pytest.raises(UnsupportedCacheError, match="LinearAttentionLayer"):
        check_cache_supported(cache)
    with pytest.raises(UnsupportedCacheError, match="DynamicCache"):
        check_cache_supported(object())
    with pytest.raises(UnsupportedCacheError, match="use_cache"):
        check_cache_supported(None)


def test_draft_for_another_target_raises_with_the_differences(llava):
    target, _draft, inputs = llava
    other = build_tiny_target("llama", vocab_size=128)
    foreign = SpecVLMDraftModel.from_target(other, hidden_size=32, target_hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"hidden size is 64, the draft expects 32") as info:
        target.generate(**inputs, max_new_tokens=4, assistant_model=foreign)
    assert "vocabulary" in str(info.value)


def test_output_hidden_states_is_refused(llava):
    target, draft, inputs = llava
    with pytest.raises(ValueError, match="output_hidden_states"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, return_dict_in_generate=True,
                        output_hidden_states=True)


def test_other_assistants_and_prompt_lookup_are_untouched(monkeypatch):
    target = build_tiny_target("llama")
    inputs = make_inputs("llama", target, with_image=False)
    calls = []
    original = loop.tree_assisted_decoding
    monkeypatch.setattr(loop, "tree_assisted_decoding", lambda *a, **k: calls.append(1) or original(*a, **k))
    greedy = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    assistant = build_tiny_target("llama", seed=3)
    assisted = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    lookup = target.generate(**inputs, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert calls == []
    assert assisted.tolist() == greedy.tolist()
    assert lookup.tolist() == greedy.tolist()
