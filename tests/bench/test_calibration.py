"""Tree-budget calibration: the pure cost/acceptance model picks the argmax; the measuring part runs on a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.bench.calibration import (
    CostCurve,
    acceptance_at,
    calibrate,
    choose_tree_budget,
    expected_tokens,
    predict_speedup,
)
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs

# Synthetic profile: acceptance per depth grows with the budget and decays with depth.
ACCEPTANCE = {
    4: [0.50, 0.20, 0.05, 0.00],
    16: [0.70, 0.45, 0.25, 0.10],
    64: [0.80, 0.60, 0.42, 0.28],
}


def verify_cost(m: float) -> float:  # flat up to 8 query tokens, then linear (a CPU-like curve), seconds
    return 0.020 + 0.001 * max(m - 8, 0)


def draft_cost(depth: int) -> float:
    return 0.002 + 0.003 * depth


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve([1, 3, 5], [1.0, 2.0, 6.0])
    assert curve(0) == 1.0 and curve(1) == 1.0
    assert curve(2) == pytest.approx(1.5) and curve(4) == pytest.approx(4.0)
    assert curve(7) == pytest.approx(10.0)  # last slope (2 per token) continued
    with pytest.raises(ValueError, match="increasing"):
        CostCurve([2, 1], [1.0, 1.0])


def test_acceptance_interpolation_is_linear_monotone_and_depth_limited():
    assert acceptance_at(ACCEPTANCE, 16) == ACCEPTANCE[16]
    assert acceptance_at(ACCEPTANCE, 10) == pytest.approx([0.6, 0.325, 0.15, 0.05])
    assert acceptance_at(ACCEPTANCE, 2) == pytest.approx([0.25, 0.1, 0.0, 0.0])  # from a_d(0) = 0; depth <= n
    assert acceptance_at(ACCEPTANCE, 500) == ACCEPTANCE[64]  # held beyond the largest budget
    noisy = {4: [0.5, 0.3], 8: [0.4, 0.35]}  # acceptance cannot drop when the tree grows: running max
    assert acceptance_at(noisy, 8) == [0.5, 0.35]
    assert expected_tokens(ACCEPTANCE, 16, 2) == pytest.approx(1 + 0.70 + 0.45)


def test_choice_is_the_argmax_of_the_model():
    kwargs = {"verify_cost": verify_cost, "draft_cycle_cost": draft_cost, "plain_token_seconds": 0.021}
    choice = choose_tree_budget(ACCEPTANCE, max_nodes=64, **kwargs)
    brute = max(
        (predict_speedup(n, d, acceptance=ACCEPTANCE, **kwargs), -n, -d, n, d)
        for n, d in itertools.product(range(1, 65), range(1, 5))
        if n >= d
    )
    assert (choice.total_tokens, choice.depth) == (brute[3], brute[4])
    assert choice.predicted_speedup == pytest.approx(brute[0])
    assert choice.expected_tokens == pytest.approx(expected_tokens(ACCEPTANCE, choice.total_tokens, choice.depth))
    assert choice.grid[choice.depth][choice.total_tokens - 1] == pytest.approx(choice.predicted_speedup)
    assert choice.grid[3][1] is None  # 2 nodes cannot make a depth-3 tree


def test_choice_follows_the_costs():
    common = {"draft_cycle_cost": lambda depth: 0.0, "plain_token_seconds": 1.0}
    # free verification: the largest tree and the deepest level win
    free = choose_tree_budget(ACCEPTANCE, verify_cost=lambda m: 1.0, max_nodes=64, **common)
    assert (free.depth, free.total_tokens) == (4, 64)
    # every extra query token is expensive: a single node
    steep = choose_tree_budget(ACCEPTANCE, verify_cost=lambda m: 1.0 + 5.0 * (m - 1), max_nodes=64, **common)
    assert (steep.depth, steep.total_tokens) == (1, 1)
    # a costly draft step pushes towards shallow trees
    deep_cost = choose_tree_budget(ACCEPTANCE, verify_cost=lambda m: 1.0, draft_cycle_cost=lambda d: 0.5 * d,
                                   plain_token_seconds=1.0, max_nodes=64)
    assert deep_cost.depth < 4


def test_choice_respects_the_drafter_capacity():
    choice = choose_tree_budget(ACCEPTANCE, verify_cost=lambda m: 1.0, draft_cycle_cost=lambda d: 0.0,
                                plain_token_seconds=1.0, max_nodes=64, max_depth=1, top_k=4)
    assert (choice.depth, choice.total_tokens) == (1, 4)  # a depth-1 tree holds at most top_k nodes


def test_calibrate_on_a_tiny_model():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target, tree_top_k=4, tree_depth=3)
    inputs = [make_inputs("llava", target, with_image=True, seed=s) for s in (0, 1)]
    result = calibrate(target, draft, inputs, budgets=(2, 8), block_sizes=(1, 4, 9), max_nodes=8,
                       pilot_max_new_tokens=6, repeats=1)
    assert result.top_k == 4 and result.pilot_depth == 6
    assert result.verify_curve.sizes == [1, 4, 9]  # max_nodes + 1 = 9 is always timed
    assert all(s > 0 for s in result.verify_curve.seconds) and result.decode_seconds > 0
    assert result.draft_costs.depths == list(range(1, 7))
    assert sorted(result.pilot_acceptance) == [2, 8]
    assert all(len(v) == 6 and all(0 <= a <= 1 for a in v) for v in result.pilot_acceptance.values())
    assert 1 <= result.choice.depth <= 6 and result.choice.depth <= result.choice.total_tokens <= 8
    data = result.to_dict()
    assert data["chosen"] == {"tree_top_k": 4, "tree_depth": result.choice.depth,
                              "tree_total_tokens": result.choice.total_tokens}


def test_calibration_passes_the_methods_loop_kwargs_to_every_speculative_call(monkeypatch):
    """`loop_kwargs` (what the benchmarked method passes, e.g. `exact_verification`) reach every speculative call of
    the calibration, so it times the verification path the method runs; plain calls get none."""
    target = build_tiny_target("llama")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target, tree_top_k=2, tree_depth=2)
    inputs = [make_inputs("llama", target, with_image=False, seed=0)]
    original, seen = type(target).generate, []

    def spy(self, *args, **kwargs):
        seen.append(("assistant_model" in kwargs, kwargs.get("exact_verification")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "generate", spy)
    calibrate(target, draft, inputs, budgets=(2,), block_sizes=(1, 3), max_nodes=2, pilot_max_new_tokens=4,
              repeats=1, loop_kwargs={"exact_verification": False})
    speculative = [value for is_speculative, value in seen if is_speculative]
    plain = [value for is_speculative, value in seen if not is_speculative]
    assert len(speculative) >= 3 and set(speculative) == {False}
    assert plain and set(plain) == {None}
