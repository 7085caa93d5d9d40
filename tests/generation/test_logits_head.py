"""Lazily applied verification head (`specvlm_hf.generation.logits_head`): grouped float32 argmax reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specvlm_hf.generation.acceptance import greedy_token_ids
from specvlm_hf.generation.logits_head import (
    GROUP_ROWS,
    SlotLogits,
    grouped_argmax_error_scale,
    likely_descendants,
)
from specvlm_hf.generation.tree import DraftTree


def _tree() -> DraftTree:
    # slots: 1 (root child, -0.1), 2 (root child, -2.0), 3 under 1 (-0.5), 4 under 1 (-0.3), 5 under 4 (-0.9)
    return DraftTree.from_parents(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([0, 0, 1, 1, 4]),
                                  torch.tensor([-0.1, -2.0, -0.5, -0.3, -0.9]))


def test_likely_descendants_come_most_probable_first():
    tree = _tree()
    assert likely_descendants(tree, 1, 8) == [1, 4, 3, 5]
    assert likely_descendants(tree, 1, 2) == [1, 4]
    assert likely_descendants(tree, 2, 8) == [2] and likely_descendants(tree, 5, 8) == [5]
    assert likely_descendants(tree, 0, 3) == [0, 1, 4]


def test_error_scale_only_for_plain_float32_linear_heads():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    scale = grouped_argmax_error_scale(head)
    unit = 2.0**-24
    expected = 8.0 * (16 * unit / (1 - 16 * unit)) * float(head.weight.detach().norm(dim=1).max())
    assert scale == pytest.approx(expected, rel=2e-3)
    assert grouped_argmax_error_scale(nn.Linear(16, 50, bias=True)) is None
    assert grouped_argmax_error_scale(head.to(torch.bfloat16)) is None
    assert grouped_argmax_error_scale(lambda h: torch.tanh(head(h))) is None  # soft-capped: no bound here
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # fp32 products may run in reduced precision
        assert grouped_argmax_error_scale(nn.Linear(16, 50, bias=False)) is None
    finally:
        torch.set_float32_matmul_precision(precision)
    assert grouped_argmax_error_scale(nn.Linear(16, 50, bias=False)) is not None


class _Counting(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_per_call: list[int] = []

    def forward(self, hidden):
        self.rows_per_call.append(hidden.shape[0])
        return super().forward(hidden)


def _setup(tie: bool = False):
    torch.manual_seed(0)
    head = _Counting(16, 40, bias=False)
    hidden = torch.randn(6, 16)
    if tie:  # tokens 3 and 7 share a long weight row and every hidden state points along it: an exact tie on top
        with torch.no_grad():
            row = torch.randn(16) * 10
            head.weight[3] = row
            head.weight[7] = row
            hidden = row.expand(6, -1) * 0.5
    with torch.no_grad():
        root = head(hidden[:1])
    head.rows_per_call.clear()
    return head, hidden, root


def test_grouped_reads_match_one_row_reads_with_fewer_head_calls():
    head, hidden, root = _setup()
    tree = _tree()
    one_row = SlotLogits(root, hidden, head, "row")
    expected = [one_row.argmax(slot) for slot in range(6)]
    assert head.rows_per_call == [1] * 5
    head.rows_per_call.clear()
    grouped = SlotLogits(root, hidden, head, "row", tree=tree, error_scale=grouped_argmax_error_scale(head))
    assert [grouped.argmax(slot) for slot in (0, 1, 4, 5)] == [expected[s] for s in (0, 1, 4, 5)]
    # slot 1 with descendants 4, 3, 5 in one call (padded to 4 rows); then 4 and 5 were already known
    assert head.rows_per_call == [4] and grouped.seconds > 0
    assert [grouped.argmax(slot) for slot in range(6)] == expected  # slot 2: a leaf, one row
    assert head.rows_per_call == [4, 1]
    assert GROUP_ROWS >= 4


def test_a_tie_within_the_bound_is_decided_by_the_one_row_product():
    head, hidden, root = _setup(tie=True)
    tree = _tree()
    grouped = SlotLogits(root, hidden, head, "row", tree=tree, error_scale=grouped_argmax_error_scale(head))
    token = grouped.argmax(1)
    assert grouped.grouped[1] == -1  # the grouped product's margin was within the bound
    assert head.rows_per_call == [4, 1]  # so slot 1 was recomputed alone
    with torch.no_grad():
        assert token == int(greedy_token_ids(head(hidden[1:2]).float()).item()) == 3  # the first maximal index
