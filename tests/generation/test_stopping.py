"""Stopping checks from a cycle's emitted tokens (`specvlm_hf.generation.stopping`) against calling the criteria."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from specvlm_hf.generation.stopping import simple_stops


class _Custom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _StricterEos(EosTokenCriteria):
    """A subclass may change the rule, so it is not treated as a plain end-of-sequence check."""


def _first_by_calling(criteria, prefix: list[int], emitted: list[int]) -> int | None:
    for i in range(len(emitted)):
        ids = torch.tensor([prefix + emitted[: i + 1]])
        if bool(criteria(ids, None).any()):
            return i
    return None


@pytest.mark.parametrize("max_length", [None, 9, 14])
@pytest.mark.parametrize("eos", [None, [3], [3, 7]])
def test_first_stop_equals_calling_the_criteria_token_by_token(max_length, eos):
    criteria = StoppingCriteriaList()
    if max_length is not None:
        criteria.append(MaxLengthCriteria(max_length))
    if eos is not None:
        criteria.append(EosTokenCriteria(torch.tensor(eos)))
    rules = simple_stops(criteria)
    assert rules is not None
    rng = random.Random(0)
    fired = 0
    for _ in range(200):
        prefix = [rng.randrange(10) for _ in range(rng.randrange(4, 9))]
        emitted = [rng.randrange(10) for _ in range(rng.randrange(1, 8))]
        expected = _first_by_calling(criteria, prefix, emitted)
        assert rules.first_stop(emitted, len(prefix)) == expected
        fired += expected is not None
    assert fired > 0 or (max_length is None and eos is None)


def test_other_criteria_keep_the_per_token_calls():
    assert simple_stops(StoppingCriteriaList([MaxLengthCriteria(10), _Custom()])) is None
    assert simple_stops(StoppingCriteriaList([_StricterEos(torch.tensor([2]))])) is None
    rules = simple_stops(StoppingCriteriaList([MaxLengthCriteria(12), MaxLengthCriteria(10)]))
    assert rules.max_length == 10 and rules.eos_ids is None and rules.first_stop([1, 2, 3], 8) == 1


def test_the_position_warning_is_kept(monkeypatch):
    """The max-length criterion's warning past the model's positions comes from calling it once the sequence reaches
    them, as the per-token calls would."""
    criterion = MaxLengthCriteria(max_length=40, max_position_embeddings=16)
    rules = simple_stops(StoppingCriteriaList([criterion]))
    assert rules.position_warners == (criterion,)
    called = []
    original = MaxLengthCriteria.__call__
    monkeypatch.setattr(MaxLengthCriteria, "__call__",
                        lambda self, ids, scores, **kw: called.append(ids.shape[-1]) or original(self, ids, scores))
    rules.warn_past_positions(12)
    assert called == []
    rules.warn_past_positions(20)
    assert called == [20]
