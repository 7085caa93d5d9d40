"""Tree speculation continues from any KV cache plain `generate` accepts (issue #12, item 1).

Three ways users reuse a cache: a prefix prefilled by hand (a system prompt cached once), the cache an earlier
`generate` call returned (plain or speculative), and multi-turn chat whose image is in the first turn only. In every
case the draft's output must equal plain `generate` given the same (copied) cache, token for token (greedy) and
bit for bit (sampling with the same seed), and the cache must end as long as plain decoding leaves it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from specvlm_hf.testing.tiny_models import FAMILIES, MULTIMODAL_FAMILIES, make_inputs

MAX_NEW = 10
SAMPLING = dict(do_sample=True, top_k=20, temperature=0.9)


def _extend(inputs: dict, new_tokens: torch.Tensor) -> dict:
    """The next turn's text-only inputs: the whole sequence so far plus `new_tokens`, a mask of ones."""
    ids = torch.cat([inputs["input_ids"], new_tokens], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros_like(new_tokens)], dim=1)
    return out


def _generate_both(target, draft, inputs, cache, **kwargs):
    """(plain, speculative) outputs, each from its own deep copy of `cache`, both with the same seed."""
    results = []
    for assistant in (None, draft):
        torch.manual_seed(7)
        own = copy.deepcopy(cache)
        out = target.generate(**inputs, past_key_values=own, max_new_tokens=MAX_NEW, assistant_model=assistant,
                              return_dict_in_generate=True, **kwargs)
        results.append((out.sequences, own))
    return results


def _assert_same(results):
    (plain, plain_cache), (spec, spec_cache) = results
    assert spec.tolist() == plain.tolist()
    assert spec_cache.get_seq_length() == plain_cache.get_seq_length()


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefilled_prefix(targets, family, sampling):
    target, draft = targets(family)
    inputs = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES, prompt_len=9)
    n = inputs["input_ids"].shape[1]
    prefix = {k: (v[:, : n - 3] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v)
              for k, v in inputs.items()}
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(**prefix, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == n - 3
    text_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                            "token_type_ids")}
    _assert_same(_generate_both(target, draft, text_inputs, cache, **(SAMPLING if sampling else {"do_sample": False})))


@pytest.mark.parametrize("first_with_draft", [False, True], ids=["after-plain", "after-speculative"])
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_continues_from_returned_cache(targets, family, first_with_draft):
    """Turn 1 (with the image where the family has one) returns a cache; turn 2 adds text and continues from it."""
    target, draft = targets(family)
    inputs = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES)
    first = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
                            assistant_model=draft if first_with_draft else None)
    turn2 = _extend({**inputs, "input_ids": first.sequences,
                     **{k: torch.cat([inputs[k], torch.zeros_like(first.sequences[:, inputs[k].shape[1]:])], dim=1)
                        for k in ("mm_token_type_ids", "token_type_ids") if k in inputs}},
                    torch.tensor([[5, 9, 13, 4]]))
    _assert_same(_generate_both(target, draft, turn2, first.past_key_values, do_sample=False))


def test_reused_cache_repro_from_issue(targets):
    """The issue's repro: prefill seq[:, :-1] by hand, then generate from the whole sequence."""
    target, draft = targets("llama")
    seq = make_inputs("llama", target, with_image=False, prompt_len=19)["input_ids"]
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=seq[:, :-1], past_key_values=cache, use_cache=True)
    inputs = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
    results = _generate_both(target, draft, inputs, cache, do_sample=False)
    _assert_same(results)
    assert results[1][1].get_seq_length() == seq.shape[1] + MAX_NEW - 1
