"""Adaptive tree size (`specvlm_hf.generation.adaptive`): the rule, and greedy equality while the tree changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.adaptive import PROBE_EVERY, WARMUP_CYCLES, AdaptiveTreeSizer
from specvlm_hf.generation.tree import DraftTree
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


def _sizer_after(cycles: int, *, accepted: int, predicted: float, ngram_matched: int | None) -> AdaptiveTreeSizer:
    """A sizer fed `cycles` drafted cycles of 12 or 4 draft nodes (+ a 10-token n-gram candidate matched
    `ngram_matched` tokens deep, when given), verification 40 ms + 1 ms per node, 3 ms per draft step, 2 ms of
    catch-up."""
    sizer = AdaptiveTreeSizer(max_depth=4, max_nodes=24)
    for c in range(cycles):
        branch = 0 if ngram_matched is None else 10
        nodes = 12 if c % 2 == 0 else 4
        sizer.expect_ngram(branch)
        assert sizer.should_draft() or sizer.cycles >= WARMUP_CYCLES
        if branch:
            sizer.observe_ngram(10, ngram_matched)
        verify = 0.04 + 0.001 * (nodes + branch)
        draft = 0.002 + 0.003 * (sizer.depth - 1)
        sizer.observe(nodes=nodes + branch, predicted=predicted, accepted=accepted, verify_seconds=verify,
                      step_seconds=0.003, cycle_seconds=verify + draft + 0.001, deepest_gain=0.1, draft_seconds=draft,
                      draft_nodes=nodes)
    return sizer


def test_a_borderline_cycle_keeps_drafting(monkeypatch):
    """Skipping needs the modelled rate without the draft to win by more than `SKIP_MARGIN`."""
    from specvlm_hf.generation import adaptive

    useless = _sizer_after(20, accepted=0, predicted=3.0, ngram_matched=10)
    useless.expect_ngram(10)
    assert not useless.should_draft()
    monkeypatch.setattr(adaptive, "SKIP_MARGIN", 1e6)
    assert useless.should_draft()


def test_drafting_is_skipped_when_it_does_not_pay_and_probed_again():
    """`should_draft`: true during the warm-up; false when the draft's expected tokens do not pay for its steps,
    catch-up and extra verification rows (a useless draft beside a reliable n-gram branch, or beside nothing: then
    the cycle is a plain decoding step); true again after `PROBE_EVERY` cycles without drafting; true for a draft
    whose tokens are accepted."""
    fresh = AdaptiveTreeSizer(max_depth=4, max_nodes=24)
    fresh.expect_ngram(10)
    assert fresh.should_draft()  # nothing measured yet

    useless = _sizer_after(20, accepted=0, predicted=3.0, ngram_matched=10)
    useless.expect_ngram(10)
    assert useless.calibration <= 0.05 and not useless.should_draft()
    useless.expect_ngram(0)  # no candidate: verifying the root alone beats a useless tree too
    assert not useless.should_draft()
    for _ in range(PROBE_EVERY):
        assert not useless.should_draft()
        useless.observe(nodes=10, predicted=0.0, accepted=0, verify_seconds=0.05, step_seconds=None,
                        cycle_seconds=0.051, deepest_gain=0.0, drafted=False)
    assert useless.since_draft == PROBE_EVERY and useless.should_draft()  # the probe
    calibration = useless.calibration
    useless.observe(nodes=22, predicted=3.0, accepted=0, verify_seconds=0.062, step_seconds=0.003,
                    cycle_seconds=0.075, deepest_gain=0.1, draft_seconds=0.011, draft_nodes=12)
    assert useless.since_draft == 0 and not useless.should_draft() and useless.calibration <= calibration

    good = _sizer_after(20, accepted=3, predicted=3.0, ngram_matched=0)
    good.expect_ngram(10)
    assert good.should_draft()
    # the same draft beside a branch that is always accepted whole: its tokens rarely count (weight 1 - p)
    beside_lookup = _sizer_after(20, accepted=3, predicted=3.0, ngram_matched=10)
    beside_lookup.expect_ngram(10)
    assert beside_lookup.ngram_accept_rate == 1.0 and not beside_lookup.should_draft()


def test_the_draft_is_credited_only_with_its_own_accepted_nodes():
    """Calibration counts the accepted nodes the draft proposed: tokens the n-gram branch alone proposed are the
    branch's (`observe_ngram`), so a branch accepted whole does not inflate the draft's calibration."""
    from specvlm_hf.generation import loop

    seen = []

    class Recording(AdaptiveTreeSizer):
        def observe(self, **kwargs):
            seen.append(kwargs)
            super().observe(**kwargs)

    sizer = Recording(max_depth=3, max_nodes=8)
    decoder = loop._RowDecoder.__new__(loop._RowDecoder)
    decoder.sizer, decoder.drafter = sizer, None
    scores = torch.tensor([-0.1, -0.2, -1.0, -30.0])
    tree = DraftTree.from_parents(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 0, 3]), scores)
    # slots 1-2 are the draft's chain, slot 3 the shared first branch token, slot 4 the branch's own node
    decoder._observe(tree, [0, 3, 4], 0.04, 0.0, torch.tensor([7, 8]), [7, 8, 9], draft_nodes=3, draft_seconds=0.01)
    assert seen[-1]["accepted"] == 1 and seen[-1]["nodes"] == 4 and seen[-1]["draft_nodes"] == 3
    assert seen[-1]["predicted"] == pytest.approx(float(scores[:3].exp().sum()))
    assert sizer.ngram_accept_rate == 1.0


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
        if not replay:  # the random draft's trees shrink after the warm-up, and some cycles verify without it
            assert len(set(out.speculation.nodes_per_cycle)) > 1
            assert 0 < out.speculation.undrafted_cycles < out.speculation.target_forwards


def test_sampling_stays_bit_identical_with_adaptive_trees():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llava", target, with_image=True)
    undrafted = 0
    for seed in range(3):
        torch.manual_seed(seed)
        plain = target.generate(**inputs, max_new_tokens=30, do_sample=True, top_k=20)
        torch.manual_seed(seed)
        spec = target.generate(**inputs, max_new_tokens=30, do_sample=True, top_k=20, assistant_model=draft,
                               return_dict_in_generate=True)
        assert spec.sequences.tolist() == plain.tolist()
        undrafted += spec.speculation.undrafted_cycles
    assert undrafted > 0  # cycles verified without the draft's tree were part of it


def test_fixed_tree_switch():
    target = build_tiny_target("llama")
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    out = target.generate(**inputs, max_new_tokens=20, do_sample=False, assistant_model=draft, tree_adaptive=False,
                          tree_total_tokens=7, tree_ngram_tokens=0, return_dict_in_generate=True)
    assert set(out.speculation.nodes_per_cycle) == {7}
