"""Unit tests of the pure distillation losses and metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from specvlm_hf.training.losses import (
    chain_acceptance_length,
    masked_sum,
    smooth_l1_feature_loss,
    soft_cross_entropy,
    top1_agreement,
)

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 9))
seeds = st.integers(0, 2**31 - 1)


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_soft_cross_entropy_is_entropy_plus_kl(shape, seed):
    teacher, draft = _randn(shape, seed, 3.0), _randn(shape, seed + 1, 3.0)
    ce = soft_cross_entropy(draft, teacher)
    assert ce.shape == shape[:-1]
    entropy = soft_cross_entropy(teacher, teacher)
    kl = F.kl_div(F.log_softmax(draft, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ce, entropy + kl, rtol=1e-5, atol=1e-5)
    assert torch.all(ce >= entropy - 1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_soft_cross_entropy_gradient_vanishes_when_distributions_match(shape, seed):
    teacher = _randn(shape, seed, 2.0)
    draft = (teacher + 5.0).clone().requires_grad_(True)  # a constant shift is the same distribution
    soft_cross_entropy(draft, teacher).sum().backward()
    torch.testing.assert_close(draft.grad, torch.zeros_like(draft), atol=1e-6, rtol=0)


def test_soft_cross_entropy_of_one_hot_teacher_is_hard_cross_entropy():
    draft = _randn((4, 7), 0)
    labels = torch.tensor([1, 0, 6, 3])
    teacher = F.one_hot(labels, 7).float() * 1e4
    torch.testing.assert_close(soft_cross_entropy(draft, teacher), F.cross_entropy(draft, labels, reduction="none"))


def test_soft_cross_entropy_is_float32_and_rejects_shape_mismatch():
    draft = _randn((2, 5), 0).bfloat16()
    assert soft_cross_entropy(draft, draft).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(2, 5), torch.zeros(2, 6))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds, beta=st.floats(0.1, 2.0))
def test_smooth_l1_zero_for_identical_and_symmetric(shape, seed, beta):
    a, b = _randn(shape, seed), _randn(shape, seed + 1, 2.0)
    assert torch.count_nonzero(smooth_l1_feature_loss(a, a.clone(), beta)) == 0
    torch.testing.assert_close(smooth_l1_feature_loss(a, b, beta), smooth_l1_feature_loss(b, a, beta))
    assert smooth_l1_feature_loss(a, b, beta).shape == shape[:-1]
    assert torch.all(smooth_l1_feature_loss(a, b, beta) >= 0)


def test_smooth_l1_regimes_and_mean_over_features():
    pred = torch.tensor([[0.0, 0.0]])
    # |d| = 0.5 < beta: 0.5 * d^2 / beta ; |d| = 3 >= beta: |d| - 0.5 * beta ; then mean over the two features
    loss = smooth_l1_feature_loss(pred, torch.tensor([[0.5, 3.0]]), beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([(0.125 + 2.5) / 2]))
    with pytest.raises(ValueError, match="same shape"):
        smooth_l1_feature_loss(torch.zeros(1, 2), torch.zeros(1, 3))


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 6)), seed=seeds)
def test_masked_sum_matches_reference_and_ignores_masked_values(shape, seed):
    values = _randn(shape, seed)
    mask = _randn(shape, seed + 1) > 0
    reference = (values * mask).sum()
    torch.testing.assert_close(masked_sum(values, mask), reference)
    poisoned = values.masked_fill(~mask, float("nan"))
    torch.testing.assert_close(masked_sum(poisoned, mask), reference)
    assert masked_sum(values, torch.zeros_like(mask)).item() == 0.0
    torch.testing.assert_close(masked_sum(values, torch.ones_like(mask)), values.sum())


def test_masked_sum_gradient_flows_only_through_kept_positions():
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    masked_sum(values * values, torch.tensor([True, False, True])).backward()
    torch.testing.assert_close(values.grad, torch.tensor([2.0, 0.0, 6.0]))


def test_top1_agreement_with_and_without_reduced_vocabulary():
    teacher = torch.tensor([[0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    assert top1_agreement(teacher.clone(), teacher).tolist() == [True, True, True]
    # the draft scores target ids [1, 3] only: index 0 -> id 1, index 1 -> id 3
    d2t = torch.tensor([1, 3])
    draft = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    # row 1: the teacher's choice (id 0) is outside the draft vocabulary, so the draft cannot agree
    assert top1_agreement(draft, teacher, d2t).tolist() == [True, False, True]


def test_chain_acceptance_length_worked_example():
    agreement = torch.tensor([[True, True, False, True, True, True]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    length = chain_acceptance_length(agreement, mask, max_depth=3)
    # from t: 1 + consecutive accepted positions t, t+1, ... (at most 3; position 5 is masked out)
    assert length.tolist() == [[3.0, 2.0, 1.0, 3.0, 2.0, 1.0]]
    assert chain_acceptance_length(agreement, mask, max_depth=1).tolist() == [[2.0, 2.0, 1.0, 2.0, 2.0, 1.0]]


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 12), depth=st.integers(1, 6), seed=seeds)
def test_chain_acceptance_length_bounds_and_extremes(length, depth, seed):
    mask = torch.ones(2, length, dtype=torch.bool)
    agreement = _randn((2, length), seed) > 0
    estimate = chain_acceptance_length(agreement, mask, depth)
    assert torch.all(estimate >= 1) and torch.all(estimate <= depth + 1)
    assert torch.all(chain_acceptance_length(torch.zeros_like(mask), mask, depth) == 1)
    full = chain_acceptance_length(torch.ones_like(mask), mask, depth)
    remaining = torch.arange(length, 0, -1).clamp(max=depth).float() + 1
    torch.testing.assert_close(full, remaining.expand(2, -1))


def test_chain_acceptance_length_validates_arguments():
    with pytest.raises(ValueError, match="batch_size, sequence_length"):
        chain_acceptance_length(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="max_depth"):
        chain_acceptance_length(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), 0)
