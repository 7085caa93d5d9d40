"""The drafter protocol, the replay diagnostic and the time accounting of `out.speculation`."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.drafter import EagleTreeDrafter, TreeKnobs
from specvlm_hf.generation.drafters import (
    DrafterContext,
    DrafterStats,
    EagleDrafterFactory,
    ReplayDrafter,
    ReplayDrafterFactory,
    TreeDrafter,
)
from specvlm_hf.generation.tree import DraftTree
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs


@pytest.fixture(scope="module")
def llava():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    return target, SpecVLMDraftModel.from_target(target)


def test_replay_proposes_the_reference_chain_with_a_decoy_per_depth():
    drafter = ReplayDrafter(reference=[5, 6, 7, 8, 9, 10, 11], depth=3, vocab_size=96)
    drafter.prefill(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))  # root = token 3 (value 8)
    tree = drafter.propose()
    assert tree.tokens.tolist() == [9, 10, 10, 11, 11, 12]
    assert tree.parents.tolist() == [0, 0, 1, 1, 3, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 3]
    drafter.extend(torch.zeros(1, 2, 4), torch.tensor([9, 10]))
    assert drafter.propose().tokens.tolist()[:1] == [11]
    assert isinstance(drafter, TreeDrafter)


def test_default_factory_builds_the_eagle_drafter(llava):
    target, draft = llava
    context = DrafterContext(draft=draft, embed_tokens=target.get_input_embeddings(),
                             lm_head=target.get_output_embeddings(), knobs=TreeKnobs(4, 3, 8), row=0,
                             prompt_ids=torch.tensor([1, 2, 3]), vocab_size=96)
    drafter = EagleDrafterFactory()(context)
    assert isinstance(drafter, EagleTreeDrafter) and isinstance(drafter, TreeDrafter)


class _FixedChain:
    """A user drafter: proposes the same two tokens every cycle (the protocol needs nothing else)."""

    def __init__(self):
        self.stats = DrafterStats()
        self.proposals = 0

    def prefill(self, inputs_embeds, features, visual_mask=None, grid_sizes=None, start_position=0):
        pass

    def extend(self, features, next_tokens):
        pass

    def propose(self) -> DraftTree:
        self.proposals += 1
        return DraftTree.from_parents(torch.tensor([5, 6]), torch.tensor([0, 1]))


def test_a_user_drafter_through_generate(llava):
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=True, batch_size=2)
    made: list[_FixedChain] = []

    def factory(context: DrafterContext) -> _FixedChain:
        made.append(_FixedChain())
        return made[-1]

    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    spec = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft, tree_drafter=factory)
    assert spec.tolist() == plain.tolist()
    assert len(made) == 2 and all(d.proposals > 0 for d in made)


@pytest.mark.parametrize("depth", [2, 4, 6])
def test_replay_oracle_accepts_its_whole_chain(llava, depth):
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=True)
    plain = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=30, do_sample=False, assistant_model=draft, tree_depth=depth,
                          tree_drafter=ReplayDrafterFactory([plain[0].tolist()]), tree_ngram_tokens=0,
                          return_dict_in_generate=True)
    assert out.sequences.tolist() == plain.tolist()
    stats = out.speculation
    full_cycles = stats.accepted_per_cycle[:-1]  # the last cycle may be cut by max_new_tokens
    assert all(n == depth + 1 for n in full_cycles)
    assert stats.draft_forwards == 0 and stats.draft_seconds == 0.0


def test_time_accounting(llava):
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=True)
    out = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft,
                          return_dict_in_generate=True)
    stats = out.speculation
    assert 0 < stats.target_prefill_seconds < stats.target_seconds < stats.total_seconds
    assert 0 < stats.draft_seconds < stats.total_seconds
    assert stats.draft_prefill_seconds <= stats.draft_seconds
    fractions = stats.time_fractions
    assert set(fractions) == {"target_forward", "draft", "loop"}
    assert abs(sum(fractions.values()) - 1.0) < 1e-9 and all(v >= 0 for v in fractions.values())
    assert stats.to_dict()["time_fractions"] == fractions


@pytest.mark.parametrize("batch_size", [1, 2])
def test_draft_step_accounting(llava, batch_size):
    """Every expansion step of a fixed depth-4 tree is timed: 3 steps per drafted tree (batch 2: one batched step for
    both rows), inside the draft's time; the replay diagnostic takes none."""
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=True, batch_size=batch_size)
    out = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft, tree_depth=4,
                          tree_adaptive=False, tree_ngram_tokens=0, return_dict_in_generate=True)
    stats = out.speculation
    assert stats.undrafted_cycles == 0 and stats.draft_steps > 0
    if batch_size == 1:
        assert stats.draft_steps == 3 * stats.target_forwards  # one tree per cycle
    else:
        assert stats.draft_steps == 3 * stats.batched_forwards  # one batched tree per cycle, all rows
    assert 0 < stats.draft_step_seconds < stats.draft_seconds
    assert stats.mean_draft_step_seconds == pytest.approx(stats.draft_step_seconds / stats.draft_steps)
    assert stats.to_dict()["mean_draft_step_seconds"] == stats.mean_draft_step_seconds
    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    replay = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft, tree_depth=4,
                             tree_drafter=ReplayDrafterFactory([row.tolist() for row in plain]), tree_ngram_tokens=0,
                             return_dict_in_generate=True)
    assert replay.speculation.draft_steps == 0 and replay.speculation.mean_draft_step_seconds is None


def test_replay_factory_refuses_a_missing_row(llava):
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=True, batch_size=2)
    with pytest.raises(ValueError, match="references"):
        target.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft,
                        tree_drafter=ReplayDrafterFactory([[1, 2, 3]]))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_fixed_block_drafter_verifies_blocks_of_its_size(targets, batch_size):
    """The cost-measurement drafter (used by the bench calibration): every cycle verifies exactly its chain, output
    stays plain `generate`'s, and every verification forward is timed."""
    from specvlm_hf.generation.drafters import FixedBlockDrafterFactory

    target, draft = targets("qwen2_vl")
    inputs = make_inputs("qwen2_vl", target, with_image=True, batch_size=batch_size)
    reference = target.generate(**inputs, max_new_tokens=10, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=10, do_sample=False, assistant_model=draft,
                          return_dict_in_generate=True, tree_ngram_tokens=0, tree_adaptive=False,
                          tree_drafter=FixedBlockDrafterFactory(5, 7))
    assert out.sequences.tolist() == reference.tolist()
    stats = out.speculation
    assert set(stats.nodes_per_cycle) == {5}
    forwards = stats.batched_forwards if batch_size > 1 else stats.target_forwards
    assert len(stats.verify_seconds_per_forward) == forwards and all(t > 0 for t in stats.verify_seconds_per_forward)


def test_eagle_drafter_defers_its_catch_up_to_the_next_tree(llava):
    """`extend` only records the committed pairs; the next `propose` catches up on all of them in one forward, which
    leaves the draft in the state that catching up cycle by cycle gives (same cache length, position, root feature
    and tree), so the loop can verify cycles without drafting."""
    target, draft = llava
    inputs = make_inputs("llava", target, with_image=False)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        hidden = target(**inputs, output_hidden_states=True).hidden_states
    features, embeds = draft.select_features(hidden), hidden[0]

    def drafter():
        made = EagleTreeDrafter(draft, target.get_input_embeddings(), target.get_output_embeddings(), TreeKnobs(4, 3, 8))
        made.prefill(embeds[:, 1:4], features[:, 0:3])
        return made

    stepwise, deferred = drafter(), drafter()
    with torch.no_grad():
        stepwise.extend(features[:, 3:5], ids[4:6])
        stepwise.propose()
        stepwise.extend(features[:, 5:7], ids[6:8])
        expected = stepwise.propose()

        forwards = deferred.stats.forwards
        deferred.extend(features[:, 3:5], ids[4:6])
        deferred.extend(features[:, 5:7], ids[6:8])
        assert deferred.stats.forwards == forwards and len(deferred.pending) == 2  # nothing ran yet
        tree = deferred.propose()
    assert deferred.pending == [] and deferred.next_position == stepwise.next_position == 7
    assert deferred.cache.get_seq_length() == stepwise.cache.get_seq_length() == 7
    torch.testing.assert_close(deferred.last_hidden, stepwise.last_hidden, rtol=1e-4, atol=1e-5)
    assert tree.tokens.tolist() == expected.tokens.tolist() and tree.parents.tolist() == expected.parents.tolist()
    with pytest.raises(ValueError, match="2 features for 1 tokens"):
        deferred.extend(features[:, 0:2], ids[0:1])
