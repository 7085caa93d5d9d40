"""Property-based tests (hypothesis) of the pure tree builders, acceptance walk and cache compaction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

from specvlm_hf.generation.acceptance import greedy_choices, greedy_token_ids, walk_tree
from specvlm_hf.generation.cache_utils import compact
from specvlm_hf.generation.tree import DraftTree, ancestor_matrix, children_table, position_ids_for_tree, select_nodes


@st.composite
def trees(draw, max_nodes: int = 24, vocab: int = 12):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(0, i)) for i in range(n)]  # node i's parent slot is in [0, i] (slot i = node i-1)
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    return DraftTree.from_parents(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


@settings(max_examples=150, deadline=None)
@given(trees())
def test_ancestry_and_depths_are_consistent(tree):
    anc, depths = tree.ancestors, tree.depths
    assert depths[0] == 0 and bool(anc[:, 0].all())  # the root is everybody's ancestor
    for i, parent in enumerate(tree.parents.tolist(), start=1):
        assert depths[i] == depths[parent] + 1
        expected = anc[parent].clone()
        expected[i] = True
        assert torch.equal(anc[i], expected)
    assert torch.equal(anc.sum(-1) - 1, depths)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-20, 0, allow_nan=False), min_size=1, max_size=40), st.integers(1, 40), st.data())
def test_selection_is_a_valid_tree_within_budget(scores, budget, data):
    c = len(scores)
    parents = torch.tensor([data.draw(st.integers(-1, i - 1)) for i in range(c)], dtype=torch.long)
    # cumulative scores never increase along a path, as in EAGLE-2
    cum = torch.tensor(scores)
    for i in range(c):
        if parents[i] >= 0:
            cum[i] = min(cum[i], cum[parents[i]])
    keep = select_nodes(cum, parents, budget)
    kept = set(keep.tolist())
    assert len(kept) <= budget
    assert keep.tolist() == sorted(kept)
    for i in kept:
        assert parents[i] < 0 or int(parents[i]) in kept  # closed under parents
    if len(set(cum.tolist())) == c:  # without ties the top-`budget` set is kept whole
        assert len(kept) == min(budget, c)


@settings(max_examples=150, deadline=None)
@given(trees(), st.data())
def test_greedy_walk_follows_matching_children(tree, data):
    vocab = 12
    logits = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=vocab, max_size=vocab),
                                             min_size=tree.num_nodes + 1, max_size=tree.num_nodes + 1)))
    choices = greedy_choices(logits)
    children = children_table(tree)
    path, emitted, stopped = walk_tree(children, lambda slot, _: choices[slot])
    assert not stopped and len(emitted) == len(path) >= 1
    for step, slot in enumerate(path):
        assert emitted[step] == choices[slot]  # every emitted token is the target's choice at its slot
        if step + 1 < len(path):
            child = path[step + 1]
            assert tree.parents[child - 1] == slot and tree.tokens[child - 1] == emitted[step]
    assert emitted[-1] not in children[path[-1]]  # the walk stops exactly when no child matches


@settings(max_examples=60, deadline=None)
@given(trees(max_nodes=10), st.integers(0, 5), st.data())
def test_stop_callback_cuts_the_walk(tree, stop_after, data):
    children = children_table(tree)
    choice = {slot: (next(iter(kids)) if kids else 0) for slot, kids in enumerate(children)}
    path, emitted, stopped = walk_tree(children, lambda slot, _: choice[slot], lambda em: len(em) > stop_after)
    assert len(emitted) <= stop_after + 1
    assert stopped == (len(emitted) == stop_after + 1)


def test_tree_positions_and_mrope():
    tree = DraftTree.from_parents(torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1]))
    assert position_ids_for_tree(tree.depths, 10).tolist() == [[10, 11, 12, 12]]
    mrope = position_ids_for_tree(tree.depths, 10, mrope_axes=3)
    assert mrope.shape == (3, 1, 4) and bool((mrope == mrope[0]).all())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.data())
def test_compaction_keeps_exactly_the_accepted_slots(prefix, n_block, data):
    keep = sorted(data.draw(st.sets(st.integers(1, n_block - 1), max_size=n_block - 1))) if n_block > 1 else []
    keep = [0] + keep
    cache = DynamicCache()
    keys = torch.randn(1, 2, prefix + n_block, 4)
    values = torch.randn(1, 2, prefix + n_block, 4)
    cache.update(keys.clone(), values.clone(), 0)
    compact(cache, n_block, keep)
    expected = torch.cat([keys[..., :prefix, :], keys[..., [prefix + k for k in keep], :]], dim=-2)
    assert torch.equal(cache.layers[0].keys, expected)
    assert cache.get_seq_length() == prefix + len(keep)


def test_ancestor_matrix_of_a_chain():
    anc = ancestor_matrix(torch.tensor([-1, 0, 1, 2]))
    assert torch.equal(anc, torch.tril(torch.ones(4, 4, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_token_ids_is_argmax_with_its_first_index_rule_for_ties(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 49_153, generator=generator).to(dtype)
    for row in range(logits.shape[0]):  # 2-5 equal maxima per row, anywhere (inside and across vector lanes)
        columns = torch.randint(0, logits.shape[1], (2 + row % 4,), generator=generator)
        logits[row, columns] = 50.0
    coarse = torch.round(logits[:16] * 2) / 2  # many ties everywhere
    strided = logits[:, ::3]  # not contiguous
    for scores in (logits, coarse, strided, logits[:1]):
        expected = scores.argmax(dim=-1)
        assert torch.equal(greedy_token_ids(scores), expected)
        first_max = (scores == scores.max(dim=-1, keepdim=True).values).int().argmax(dim=-1)
        assert torch.equal(expected, first_max)  # the rule itself: the lowest index among the maxima
    assert greedy_choices(logits[:3]) == logits[:3].argmax(dim=-1).tolist()
