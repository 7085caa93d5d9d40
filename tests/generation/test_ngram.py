"""The n-gram branch (`specvlm_hf.generation.ngram`): candidates, merging, and losslessness with branches present."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.ngram import NGRAM_SCORE, merge_branch, ngram_candidate
from specvlm_hf.generation.tree import DraftTree
from specvlm_hf.testing.tiny_models import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs


def test_candidate_follows_the_latest_longest_match():
    ids = torch.tensor([5, 6, 7, 8, 9, 6, 7, 4, 1, 6, 7])
    assert ngram_candidate(ids, 3).tolist() == [4, 1, 6]  # "6 7" last seen before position 7
    assert ngram_candidate(ids, 3, max_ngram=1).tolist() == [4, 1, 6]
    assert ngram_candidate(torch.tensor([1, 2, 3]), 3).tolist() == []
    assert ngram_candidate(ids, 0).tolist() == []
    assert ngram_candidate(torch.tensor([3, 9, 3]), 4).tolist() == [9, 3]


def test_matched_prefix_counts_the_leading_agreement():
    from specvlm_hf.generation.ngram import matched_prefix

    assert matched_prefix([5, 6, 7], [5, 6, 9, 7]) == 2
    assert matched_prefix([5, 6, 7], [5, 6, 7, 8]) == 3
    assert matched_prefix([5, 6, 7], [4]) == 0 and matched_prefix([], [4]) == 0


def test_merge_shares_existing_prefixes_and_appends_the_rest():
    tree = DraftTree.from_parents(torch.tensor([10, 11, 12]), torch.tensor([0, 1, 0]), torch.tensor([-0.1, -0.5, -0.9]))
    merged = merge_branch(tree, torch.tensor([10, 11, 13, 14]))
    assert merged.tokens.tolist() == [10, 11, 12, 13, 14]
    assert merged.parents.tolist() == [0, 1, 0, 2, 4]
    assert merged.scores[3:].tolist() == [NGRAM_SCORE, NGRAM_SCORE]
    assert merged.depths.tolist() == [0, 1, 2, 1, 3, 4]
    assert merge_branch(tree, torch.tensor([10, 11])) is tree
    assert merge_branch(tree, torch.tensor([], dtype=torch.long)) is tree


def _repetitive(family, target):
    """A prompt that repeats itself, so the n-gram branch finds matches."""
    inputs = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES, prompt_len=6)
    ids = inputs["input_ids"]
    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    echo = torch.cat([ids, plain[:, ids.shape[1]:], plain[:, ids.shape[1]:]], dim=1)
    out = {k: v for k, v in inputs.items()}
    out["input_ids"], out["attention_mask"] = echo, torch.ones_like(echo)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros_like(echo[:, ids.shape[1]:])], dim=1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equality_with_ngram_branches(family):
    target = build_tiny_target(family)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = _repetitive(family, target)
    plain = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    with_ngram = target.generate(**inputs, max_new_tokens=30, do_sample=False, assistant_model=draft,
                                 return_dict_in_generate=True, tree_adaptive=False)
    without = target.generate(**inputs, max_new_tokens=30, do_sample=False, assistant_model=draft,
                              return_dict_in_generate=True, tree_adaptive=False, tree_ngram_tokens=0)
    assert with_ngram.sequences.tolist() == plain.tolist() == without.sequences.tolist()
    assert max(with_ngram.speculation.nodes_per_cycle) > max(without.speculation.nodes_per_cycle)  # branches added


def test_ngram_branches_accept_tokens_an_untrained_draft_misses():
    target = build_tiny_target("qwen2")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = _repetitive("qwen2", target)
    kwargs = dict(max_new_tokens=30, do_sample=False, assistant_model=draft, return_dict_in_generate=True,
                  tree_adaptive=False)
    with_ngram = target.generate(**inputs, **kwargs).speculation
    without = target.generate(**inputs, tree_ngram_tokens=0, **kwargs).speculation
    assert with_ngram.mean_accept_len > without.mean_accept_len


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_sampling_is_bit_identical_with_ngram_branches(family):
    target = build_tiny_target(family)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = _repetitive(family, target)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = target.generate(**inputs, max_new_tokens=24, do_sample=True, top_k=10, temperature=0.7)
        torch.manual_seed(seed)
        spec = target.generate(**inputs, max_new_tokens=24, do_sample=True, top_k=10, temperature=0.7,
                               assistant_model=draft)
        assert spec.tolist() == plain.tolist()


def test_negative_knob_is_refused():
    target = build_tiny_target("llama")
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    with pytest.raises(ValueError, match="tree_ngram_tokens"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, tree_ngram_tokens=-1)


def test_the_draft_config_knobs_apply_and_a_call_overrides_them():
    target = build_tiny_target("qwen2")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target, tree_ngram_tokens=0, tree_adaptive=False)
    inputs = _repetitive("qwen2", target)
    kwargs = dict(max_new_tokens=20, do_sample=False, assistant_model=draft, return_dict_in_generate=True)
    off = target.generate(**inputs, **kwargs).speculation
    on = target.generate(**inputs, tree_ngram_tokens=6, **kwargs).speculation
    assert set(off.nodes_per_cycle) == {draft.config.tree_total_tokens}  # fixed tree, no branch
    assert max(on.nodes_per_cycle) > draft.config.tree_total_tokens


def test_fallback_knobs_equal_the_config_defaults():
    """Drafts whose config predates the n-gram knobs get the same defaults as a new config."""
    from specvlm_hf import SpecVLMDraftConfig
    from specvlm_hf.generation.loop import NGRAM_DEFAULTS

    config = SpecVLMDraftConfig()
    assert NGRAM_DEFAULTS == {"tree_ngram_tokens": config.tree_ngram_tokens, "tree_ngram_max": config.tree_ngram_max}
