"""Reduced draft heads by default for large target vocabularies: the data-free id rule, overrides, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.models import (
    AUTO_DRAFT_VOCAB_LOWEST_SHARE,
    AUTO_DRAFT_VOCAB_MAX_FULL,
    AUTO_DRAFT_VOCAB_SIZE,
    default_draft_vocab_ids,
    resolve_draft_vocab_size,
    special_token_ids,
)
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs, reserved_token_ids

#: More tokens than `AUTO_DRAFT_VOCAB_MAX_FULL`; the tiny models' width (32) keeps such a target at a few MB.
LARGE_VOCAB = AUTO_DRAFT_VOCAB_MAX_FULL + 4464


def test_resolve_draft_vocab_size():
    assert resolve_draft_vocab_size(AUTO_DRAFT_VOCAB_MAX_FULL) is None
    assert resolve_draft_vocab_size(AUTO_DRAFT_VOCAB_MAX_FULL + 1) == AUTO_DRAFT_VOCAB_SIZE
    assert resolve_draft_vocab_size(AUTO_DRAFT_VOCAB_MAX_FULL + 1, "auto") == AUTO_DRAFT_VOCAB_SIZE
    for full in (0, "full", "FULL"):
        assert resolve_draft_vocab_size(262144, full) is None
    assert resolve_draft_vocab_size(96, 40) == 40
    for bad in (-1, "half", 2.5, True):
        with pytest.raises(ValueError, match="draft_vocab_size"):
            resolve_draft_vocab_size(262144, bad)


def test_config_zero_means_full_head():
    assert SpecVLMDraftConfig(draft_vocab_size=0).draft_vocab_size is None
    assert SpecVLMDraftModel(SpecVLMDraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                draft_vocab_size=0)).lm_head is None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_large_vocabulary_gets_a_reduced_head_by_default(family):
    target = build_tiny_target(family, vocab_size=LARGE_VOCAB)
    draft = SpecVLMDraftModel.from_target(target)
    assert draft.config.draft_vocab_size == AUTO_DRAFT_VOCAB_SIZE
    assert draft.lm_head.weight.shape == (AUTO_DRAFT_VOCAB_SIZE, draft.config.hidden_size)
    d2t = draft.d2t
    assert d2t.shape == (AUTO_DRAFT_VOCAB_SIZE,) and torch.equal(d2t, d2t.sort().values)
    assert d2t.unique().numel() == AUTO_DRAFT_VOCAB_SIZE and int(d2t.max()) < LARGE_VOCAB
    # every special id of the target's configs is in, including the image tokens at the top of the vocabulary
    ids = reserved_token_ids(LARGE_VOCAB)
    expected = {0, 1, 2} | ({ids["image"], ids["image_start"], ids["image_end"]} if family == "gemma3" else set())
    assert expected <= set(special_token_ids(target)) <= set(d2t.tolist())
    # the untrained head is the target's head restricted to those ids
    head = target.get_output_embeddings()
    hidden = torch.randn(3, draft.config.hidden_size)
    torch.testing.assert_close(draft.compute_logits(hidden), head(hidden)[:, d2t])
    assert draft.compatibility_problems(target) == []


def test_small_vocabulary_keeps_the_full_head():
    target = build_tiny_target("llama", vocab_size=AUTO_DRAFT_VOCAB_MAX_FULL)
    draft = SpecVLMDraftModel.from_target(target)
    assert draft.lm_head is None and draft.d2t is None and draft.config.draft_vocab_size is None


def test_explicit_overrides():
    target = build_tiny_target("llama", vocab_size=LARGE_VOCAB)
    for full in (0, "full"):
        draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=full)
        assert draft.lm_head is None and draft.config.draft_vocab_size is None
    draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=100)
    assert draft.d2t.numel() == 100 and {0, 1, 2} <= set(draft.d2t.tolist())
    torch.testing.assert_close(draft.lm_head.weight, target.get_output_embeddings().weight[draft.d2t])
    # an explicit size also applies to small vocabularies
    small = build_tiny_target("llama")
    assert SpecVLMDraftModel.from_target(small, draft_vocab_size=40).d2t.numel() == 40
    with pytest.raises(ValueError, match="draft_vocab_size"):
        SpecVLMDraftModel.from_target(target, draft_vocab_size="most")
    with pytest.raises(ValueError, match="special ids"):
        SpecVLMDraftModel.from_target(target, draft_vocab_size=2)  # fewer than pad, bos, eos


def _prior_target() -> LlamaForCausalLM:
    """A 100-token Llama whose head rows all point along one direction except ids 90-93, which point against it."""
    config = LlamaConfig(vocab_size=100, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=50,
                         tie_word_embeddings=False)
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        weight = target.get_output_embeddings().weight
        weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.01 * torch.randn(100, 4))
        weight[90:94] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    return target


def test_default_rule_specials_then_lowest_then_head_prior():
    target = _prior_target()
    assert special_token_ids(target) == [0, 1, 50]
    size = 16
    ids = default_draft_vocab_ids(target, size).tolist()
    n_lowest = int(size * AUTO_DRAFT_VOCAB_LOWEST_SHARE)
    assert len(ids) == size
    # specials (0, 1, 50), then the lowest ids up to 3/4 of the size, then the rows farthest from the mean row
    assert ids == sorted({0, 1, 50, *range(2, n_lowest - 1), 90, 91, 92, 93})
    # deterministic
    assert default_draft_vocab_ids(target, size).tolist() == ids


def test_config_round_trip_keeps_the_map(tmp_path):
    target = build_tiny_target("llama", vocab_size=LARGE_VOCAB)
    draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=300)
    draft.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.draft_vocab_size == 300
    assert torch.equal(loaded.d2t, draft.d2t)
    assert torch.equal(loaded.lm_head.weight, draft.lm_head.weight)
    assert torch.equal(loaded.draft_to_target(torch.tensor([0, 299])), draft.d2t[[0, 299]])
    # a saved full-head draft stays a full-head draft, whatever the target's vocabulary
    SpecVLMDraftModel.from_target(target, draft_vocab_size="full").save_pretrained(tmp_path / "full")
    assert AutoModel.from_pretrained(tmp_path / "full").lm_head is None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_default_reduced_head_is_lossless(family):
    target = build_tiny_target(family, vocab_size=LARGE_VOCAB)
    draft = SpecVLMDraftModel.from_target(target)
    assert draft.lm_head is not None
    inputs = make_inputs(family, target, with_image=family == "gemma3", batch_size=2)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert out.tolist() == reference.tolist()
