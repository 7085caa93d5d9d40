"""Sampling with a SpecVLM draft has exactly the target's distribution."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.acceptance import recursive_rejection_walk, sample_walk, walk_tree
from specvlm_hf.generation.tree import DraftTree, children_table
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs

# ---------------------------------------------------------------------------------------------------------------------
# statistical test of the acceptance rules on a small vocabulary
# ---------------------------------------------------------------------------------------------------------------------
VOCAB = 6
# root has children tokens 0, 1, 2 (slots 1-3); slot 1 has children 3, 4 (slots 4-5); slot 2 has child 5 (slot 6)
TREE = DraftTree.from_parents(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 0, 1, 1, 2]))
N_DRAWS = 40_000


def _target_probs(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(TREE.num_nodes + 1, VOCAB, generator=gen) * 1.5, dim=-1)


def _wrong_rule(probs, children, generator):
    """A classic lossy bug: try each child with probability p(child) WITHOUT renormalising after rejections, then
    fall back to sampling from the full distribution (rejected children included)."""

    def choose(slot, _emitted):
        for tok in children[slot]:
            if torch.rand((), generator=generator) < probs[slot, tok]:
                return tok
        return int(torch.multinomial(probs[slot], 1, generator=generator))

    path, emitted, _ = walk_tree(children, choose)
    return path, emitted


def _max_deviation(rule) -> float:
    """Largest total-variation distance between the empirical and exact laws of the first two emitted tokens."""
    probs = _target_probs()
    children = children_table(TREE)
    gen = torch.Generator().manual_seed(123)
    first = torch.zeros(VOCAB)
    second = {tok: torch.zeros(VOCAB) for tok in children[0]}
    for _ in range(N_DRAWS):
        _path, emitted = rule(probs, children, gen)
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0]][emitted[1]] += 1
    tv = [0.5 * (first / N_DRAWS - probs[0]).abs().sum().item()]
    for tok, counts in second.items():
        if counts.sum() > 2000:  # conditional law of the next token given an accepted child
            tv.append(0.5 * (counts / counts.sum() - probs[children[0][tok]]).abs().sum().item())
    return max(tv)


# With 40k draws (>=2000 per conditional law) sampling noise of a TV is <= ~0.02; the threshold leaves a margin, the lossy
# rule below lands far beyond it.
TV_THRESHOLD = 0.035


@pytest.mark.parametrize("rule", [sample_walk, recursive_rejection_walk], ids=["sample_then_descend", "recursive_rejection"])
def test_acceptance_rule_preserves_target_distribution(rule):
    assert _max_deviation(rule) < TV_THRESHOLD


def test_statistical_check_catches_a_lossy_rule():
    assert _max_deviation(_wrong_rule) > 2 * TV_THRESHOLD


# ---------------------------------------------------------------------------------------------------------------------
# end to end: the loop consumes the RNG exactly like plain sampling
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,with_image", [("llava", True), ("qwen2_vl", True), ("gemma3", True), ("llama", False)])
@pytest.mark.parametrize("settings", [dict(top_k=20), dict(temperature=0.7, top_p=0.9), dict(repetition_penalty=1.3)])
def test_sampling_is_bit_identical_to_plain_sampling(family, with_image, settings):
    target = build_tiny_target(family)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(family, target, with_image=with_image)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = target.generate(**inputs, max_new_tokens=20, do_sample=True, **settings)
        torch.manual_seed(seed)
        spec = target.generate(**inputs, max_new_tokens=20, do_sample=True, assistant_model=draft, **settings)
        assert spec.tolist() == plain.tolist()


def test_sampling_with_a_bfloat16_draft_is_bit_identical_to_plain_sampling():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)
    inputs = make_inputs("llava", target, with_image=True)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = target.generate(**inputs, max_new_tokens=20, do_sample=True, top_k=20)
        torch.manual_seed(seed)
        spec = target.generate(**inputs, max_new_tokens=20, do_sample=True, top_k=20, assistant_model=draft)
        assert spec.tolist() == plain.tolist()


def test_sampling_law_end_to_end_small_vocab():
    """Empirical law of the first generated tokens with and without the draft agree (two-sample TV)."""
    target = build_tiny_target("llama", vocab_size=16)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    n = 300
    counts = {}
    for name, kwargs in (("plain", {}), ("spec", {"assistant_model": draft})):
        torch.manual_seed(1000 if name == "plain" else 2000)  # independent streams
        hist = torch.zeros(16, 16)
        for _ in range(n):
            out = target.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=1.5, **kwargs)
            a, b = out[0, -3:-1].tolist()
            hist[a, b] += 1
        counts[name] = hist / n
    tv = 0.5 * (counts["plain"] - counts["spec"]).abs().sum().item()
    assert tv < 0.35  # two-sample noise for 300 draws over <=256 cells; a wrong law (e.g. greedy) gives ~1
