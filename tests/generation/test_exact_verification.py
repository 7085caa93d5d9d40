"""Exact verification attention (issue #11): bf16 greedy tree speculation bitwise equal to plain decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.cache_utils import tree_attention_mask
from specvlm_hf.generation.exact_attention import (
    EXACT_ATTENTION,
    PLAN_KWARG,
    RowwisePlan,
    exact_attention_selected,
    exact_sdpa_attention,
    probe_exact_verification,
)
from specvlm_hf.generation.drafters import ReplayDrafterFactory
from specvlm_hf.generation.tree import DraftTree
from specvlm_hf.testing.tiny_models import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs
from transformers import DynamicCache

PROBE = probe_exact_verification("cpu", torch.bfloat16, hidden_size=64)
needs_exact_kernels = pytest.mark.skipif(
    not PROBE.exact, reason=f"this machine's bf16 kernels fail the exactness probe: {PROBE.reason}"
)


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _random_tree(n: int, seed: int) -> DraftTree:
    g = torch.Generator().manual_seed(seed)
    parents = [int(torch.randint(0, i + 1, (), generator=g)) for i in range(n)]
    return DraftTree.from_parents(torch.arange(n), torch.tensor(parents))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_pad", [0, 3])
def test_each_row_equals_its_own_one_token_call_and_the_keys_are_restored(dtype, n_pad):
    tree = _random_tree(11, seed=5)
    n, prefix = tree.num_nodes + 1, 40
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, n, 16, generator=g).to(dtype)
    key = torch.randn(1, 2, prefix + n, 16, generator=g).to(dtype)
    value = torch.randn(1, 2, prefix + n, 16, generator=g).to(dtype)
    cache = DynamicCache()
    cache.update(key[:, :, :prefix].clone(), value[:, :, :prefix].clone(), 0)
    padding: dict = {}
    mask = tree_attention_mask(cache, None, tree.ancestors, tree.depths, n_pad, dtype, torch.device("cpu"),
                               padding=padding)
    plan = RowwisePlan.from_masks(mask, padding, padded_batch=n_pad > 0)
    k_before, v_before = key.clone(), value.clone()
    out, _ = exact_sdpa_attention(_Module(), query, key, value, mask, scaling=0.25, **{PLAN_KWARG: plan})
    assert torch.equal(key, k_before) and torch.equal(value, v_before)
    allowed = mask[0, 0] == 0
    for row in range(n):
        cols = torch.nonzero(allowed[row] | (torch.arange(prefix + n) < n_pad), as_tuple=False).flatten()
        row_mask = (cols >= n_pad).view(1, 1, 1, -1) if n_pad else None
        k = key[:, :, cols].repeat_interleave(2, dim=1)
        v = value[:, :, cols].repeat_interleave(2, dim=1)
        expected = F.scaled_dot_product_attention(query[:, :, row : row + 1], k, v, attn_mask=row_mask, scale=0.25)
        torch.testing.assert_close(out[:, row], expected.transpose(1, 2)[:, 0], atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)


def test_without_a_plan_it_is_stock_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    mask = torch.zeros(1, 1, 5, 9)
    ours, _ = exact_sdpa_attention(_Module(), q, k, v, mask, scaling=0.3)
    stock, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    assert torch.equal(ours, stock)


def test_selection_is_scoped_and_nests():
    target = build_tiny_target("llava")
    config = target.config.get_text_config()
    assert config._attn_implementation == "sdpa"
    with exact_attention_selected(target) as active:
        assert active and config._attn_implementation == EXACT_ATTENTION
        with exact_attention_selected(target):
            assert config._attn_implementation == EXACT_ATTENTION
        assert config._attn_implementation == EXACT_ATTENTION
    assert config._attn_implementation == "sdpa"
    with exact_attention_selected(target, enabled=False) as active:
        assert not active and config._attn_implementation == "sdpa"


def test_probe_is_cached_and_explains_a_failure():
    again = probe_exact_verification("cpu", torch.bfloat16, hidden_size=64)
    assert again is PROBE
    assert PROBE.exact or PROBE.reason


def test_exact_verification_true_on_eager_is_refused():
    target = build_tiny_target("llama")
    target.set_attn_implementation("eager")
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, exact_verification=True)


BF16_CASES = [
    (family, with_image, batch_size)
    for family in FAMILIES
    for with_image in ((False, True) if family in MULTIMODAL_FAMILIES else (False,))
    for batch_size in (1, 2)
]


@needs_exact_kernels
@pytest.mark.parametrize("family,with_image,batch_size", BF16_CASES)
def test_bf16_greedy_is_bitwise_plain_decoding(family, with_image, batch_size):
    target = build_tiny_target(family).to(torch.bfloat16)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)
    inputs = make_inputs(family, target, with_image=with_image, batch_size=batch_size, prompt_len=30)
    kwargs = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=batch_size == 1)
    plain = target.generate(**inputs, **kwargs)
    spec = target.generate(**inputs, assistant_model=draft, **kwargs)
    assert spec.speculation.exact_verification
    assert spec.sequences.tolist() == plain.sequences.tolist()
    if batch_size == 1:  # every emitted token's logits, bit for bit
        assert len(spec.logits) == len(plain.logits)
        assert all(torch.equal(a, b) for a, b in zip(spec.logits, plain.logits))


@needs_exact_kernels
def test_the_fast_path_is_a_switch_and_is_not_exact_here():
    """The control: stock multi-token SDPA rounds differently, so the logits differ (this is what the exact path fixes)."""
    target = build_tiny_target("llama").to(torch.bfloat16)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)
    inputs = make_inputs("llama", target, with_image=False, prompt_len=30)
    kwargs = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain = target.generate(**inputs, **kwargs)
    fast = target.generate(**inputs, assistant_model=draft, exact_verification=False, tree_adaptive=False,
                           tree_ngram_tokens=0, **kwargs)
    assert not fast.speculation.exact_verification
    n = min(len(fast.logits), len(plain.logits))
    assert not all(torch.equal(a, b) for a, b in zip(fast.logits[:n], plain.logits[:n]))


@needs_exact_kernels
@pytest.mark.parametrize("family,with_image", [
    ("llava", True), ("llava_next", True), ("qwen2_vl", True), ("qwen2_5_vl", False), ("idefics3", True),
    ("gemma3", True), ("gemma3", False), ("llama", False), ("qwen2", False)])
def test_bf16_batch_of_four_is_bitwise_plain_decoding_in_one_forward(family, with_image):
    """Exact verification of a batch in one forward per cycle: rows of different lengths accepting different lengths
    per cycle (a replay draft spoiled differently per row), each laid out as at batch size 1."""
    target = build_tiny_target(family).to(torch.bfloat16)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)
    inputs = make_inputs(family, target, with_image=with_image, batch_size=4, prompt_len=12)
    kwargs = dict(max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    plain = target.generate(**inputs, **kwargs)
    mask = inputs["attention_mask"]
    n = mask.shape[1]
    references = []
    for r, every in enumerate((0, 2, 3, 5)):
        row = inputs["input_ids"][r][mask[r].bool()].tolist() + plain.sequences[r, n:].tolist()
        start = int(mask[r].sum()) + 1
        for i in range(start, len(row), every or len(row)):
            row[i] = (row[i] + 7) % 80 + 3 if every else row[i]
        references.append(row)
    for extra in ({}, {"tree_drafter": ReplayDrafterFactory(references), "tree_depth": 6}):
        spec = target.generate(**inputs, assistant_model=draft, **kwargs, **extra)
        assert spec.speculation.exact_verification and spec.speculation.batched_forwards > 0
        assert spec.sequences.tolist() == plain.sequences.tolist()


@needs_exact_kernels
def test_linear_shapes_probe_routes_a_batch_row_by_row_where_it_fails(monkeypatch):
    """Where the target's GEMMs are row-invariant for one row's block but not for the batched forward's row count, the
    rows are verified one after another, still exactly; where they fail already for one block, the automatic choice is
    the fast path (the row-wise attention could not make verification bitwise), and `exact_verification=True` still
    runs it, the batch in one forward."""
    from specvlm_hf.generation import loop
    from specvlm_hf.generation.exact_attention import ExactnessProbe, probe_linear_shapes

    assert probe_linear_shapes("cpu", torch.bfloat16, [(64, 64)], 8) is probe_linear_shapes("cpu", torch.bfloat16,
                                                                                          [(64, 64)], 8)
    target = build_tiny_target("llava").to(torch.bfloat16)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)
    inputs = make_inputs("llava", target, with_image=True, batch_size=2, prompt_len=12)
    kwargs = dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    plain = target.generate(**inputs, **kwargs)
    block = draft.config.tree_total_tokens + draft.config.tree_ngram_tokens + 1  # rows of one block
    for limit, batched, requested in ((block, False, None), (2, True, True)):
        monkeypatch.setattr(loop, "probe_linear_shapes", lambda device, dtype, shapes, rows, limit=limit:
                            ExactnessProbe(rows <= limit, "" if rows <= limit else "not row-invariant"))
        spec = target.generate(**inputs, assistant_model=draft, exact_verification=requested, **kwargs)
        assert spec.speculation.exact_verification
        assert (spec.speculation.batched_forwards > 0) == batched
        assert spec.sequences.tolist() == plain.sequences.tolist()  # the real kernels here are row-invariant
    auto = target.generate(**inputs, assistant_model=draft, **kwargs)  # the probe still fails from 3 rows on
    assert not auto.speculation.exact_verification
