"""Adaptive tree size (`specvlm_hf.generation.adaptive`): the rule, and greedy equality while the tree changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.adaptive import WARMUP_CYCLES, AdaptiveTreeSizer
from specvlm_hf.testing.tiny_models import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs

from .oracle import oracle


def _feed(sizer, cycles, *, nodes_fn, accepted_fn, verify_fn, step=0.004, gain=0.0, predicted=1.0):
    for c in range(cycles):
        n = nodes_fn(c)
        sizer.observe(nodes=n, predicted=predicted, accepted=accepted_fn(c), verify_seconds=verify_fn(n),
                      step_seconds=step, cycle_seconds=verify_fn(n) + step * sizer.depth + 0.002, deepest_gain=gain)


def test_warmup_alternates_full_and_quarter_budgets():
    sizer = AdaptiveTreeSizer(max_depth=5, max_nodes=24)
    scores = torch.zeros(40)
    budgets = []
    for c in range(WARMUP_CYCLES):
        budgets.append(sizer.budget(scores))
        _feed(sizer, 1, nodes_fn=lambda _: budgets[-1], accepted_fn=lambda _: 0, verify_fn=lambda n: 0.04)
    assert budgets == [24, 6, 24, 6]


def test_a_draft_that_accepts_nothing_shrinks_to_a_small_shallow_tree():
    sizer = AdaptiveTreeSizer(max_depth=5, max_nodes=24)
    _feed(sizer, 30, nodes_fn=lambda c: 24 if c % 2 == 0 else 6, accepted_fn=lambda _: 0,
          verify_fn=lambda n: 0.04 + 0.002 * n, gain=0.3, predicted=3.0)
    assert sizer.depth == 1
    assert sizer.calibration <= 0.05
    assert sizer.budget(torch.log(torch.full((40,), 0.5))) <= 2


def test_a_good_draft_on_cheap_verification_keeps_the_full_tree():
    sizer = AdaptiveTreeSizer(max_depth=5, max_nodes=24)
    _feed(sizer, 30, nodes_fn=lambda c: 24 if c % 2 == 0 else 6, accepted_fn=lambda _: 4,
          verify_fn=lambda n: 0.04 + 0.00001 * n, gain=1.0, predicted=4.0)
    assert sizer.depth == 5
    assert sizer.budget(torch.log(torch.linspace(0.9, 0.2, 40))) == 24


def test_an_ngram_branch_that_keeps_being_accepted_shrinks_the_draft_tree():
    """The n-gram branch's acceptance rate `p` is learnt from cycles; the draft's expected tokens then count only when
    the branch's first token fails (`1 - p`), so a reliable branch shrinks the draft's tree and depth; without
    evidence (`p = 0`), or in a cycle without a candidate, the rule is the draft-only one."""
    def fed(ngram: bool) -> AdaptiveTreeSizer:
        sizer = AdaptiveTreeSizer(max_depth=5, max_nodes=24)
        for c in range(30):
            sizer.expect_ngram(10 if ngram else 0)
            if ngram:
                sizer.observe_ngram(10, 10 if c % 10 else 4)  # almost always accepted whole
            _feed(sizer, 1, nodes_fn=lambda _, c=c: 24 if c % 2 == 0 else 6, accepted_fn=lambda _: 4,
                  verify_fn=lambda n: 0.04 + 0.0008 * n, gain=0.6, predicted=4.0)
        return sizer

    scores = torch.log(torch.linspace(0.9, 0.05, 40))
    plain, repeating = fed(False), fed(True)
    assert repeating.ngram_accept_rate == pytest.approx(0.985, abs=0.01)
    repeating.expect_ngram(10)
    assert repeating.ngram_gain > 8.0
    assert repeating.budget(scores) < plain.budget(scores) and repeating.depth < plain.depth
    repeating.expect_ngram(0)  # a cycle without a candidate: the draft-only rule, whatever was learnt of the branch
    unaware = dataclasses.replace(repeating, _ngram_hits=0.0, _ngram_trials=0.0)
    assert repeating.ngram_gain == 0.0 and repeating.budget(scores) == unaware.budget(scores)
    assert plain.budget(scores) > 1
    fresh = AdaptiveTreeSizer(max_depth=5, max_nodes=24)
    fresh.expect_ngram(10)
    assert fresh.ngram_accept_rate == 0.0 and fresh.ngram_gain == 0.0  # no evidence yet
    fresh.observe_ngram(0, 0)  # no candidate: nothing learnt
    assert fresh.ngram_accept_rate == 0.0


def test_verify_cost_fit_recovers_a_line():
    sizer = AdaptiveTreeSizer(max_depth=3, max_nodes=24)
    _feed(sizer, 10, nodes_fn=lambda c: 4 + 2 * c, accepted_fn=lambda _: 1, verify_fn=lambda n: 0.03 + 0.001 * n)
    assert abs(sizer.verify_cost(10.0) - 0.04) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equality_while_the_tree_changes_size(family):
    target = build_tiny_target(family)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES)
    plain = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    for replay in ({}, oracle([plain[0].tolist()])):
        out = target.generate(**inputs, max_new_tokens=40, do_sample=False, assistant_model=draft,
                              return_dict_in_generate=True, **replay)
        assert out.sequences.tolist() == plain.tolist()
        if not replay:  # the random draft's trees shrink after the warm-up
            assert len(set(out.speculation.nodes_per_cycle)) > 1


def test_sampling_stays_bit_identical_with_adaptive_trees():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llava", target, with_image=True)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = target.generate(**inputs, max_new_tokens=30, do_sample=True, top_k=20)
        torch.manual_seed(seed)
        spec = target.generate(**inputs, max_new_tokens=30, do_sample=True, top_k=20, assistant_model=draft)
        assert spec.tolist() == plain.tolist()


def test_fixed_tree_switch():
    target = build_tiny_target("llama")
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    out = target.generate(**inputs, max_new_tokens=20, do_sample=False, assistant_model=draft, tree_adaptive=False,
                          tree_total_tokens=7, tree_ngram_tokens=0, return_dict_in_generate=True)
    assert set(out.speculation.nodes_per_cycle) == {7}
