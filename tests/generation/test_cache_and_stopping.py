"""KV-cache state after speculation, and exact stopping inside accepted chunks."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs

from .oracle import oracle


def _draft(target):
    torch.manual_seed(1)
    return SpecVLMDraftModel.from_target(target)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llama"])
@pytest.mark.parametrize("use_replay", [False, True])
def test_cache_equals_fresh_prefill_of_final_sequence(family, use_replay):
    target = build_tiny_target(family)
    inputs = make_inputs(family, target, with_image=family != "llama")
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    replay = oracle([reference[0].tolist()]) if use_replay else {}
    out = target.generate(
        **inputs, max_new_tokens=20, do_sample=False, assistant_model=_draft(target), return_dict_in_generate=True,
        **replay,
    )
    assert out.sequences.tolist() == reference.tolist()
    # fresh prefill of everything but the last token (never fed, exactly as in plain decoding): the prompt with its
    # image, then the generated text as one more chunk (generated ids may include the image placeholder id, which a
    # one-shot multimodal prefill would misread as an extra image)
    fresh = DynamicCache(config=target.config)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        target(**inputs, past_key_values=fresh, use_cache=True)
        target(input_ids=out.sequences[:, n_prompt:-1], past_key_values=fresh, use_cache=True)
    spec_cache = out.past_key_values
    assert spec_cache.get_seq_length() == fresh.get_seq_length()
    for ours, theirs in zip(spec_cache.layers, fresh.layers):
        n = min(ours.keys.shape[-2], theirs.keys.shape[-2])  # sliding layers keep only their window
        torch.testing.assert_close(ours.keys[..., -n:, :], theirs.keys[..., -n:, :], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values[..., -n:, :], theirs.values[..., -n:, :], atol=2e-5, rtol=1e-4)


def test_eos_inside_an_accepted_chunk_stops_exactly():
    target = build_tiny_target("llava")
    inputs = make_inputs("llava", target, with_image=True)
    free = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    eos = free[0, n_prompt + 5].item()  # make the 6th generated token an end-of-sequence token
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    out = target.generate(
        **inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos, assistant_model=_draft(target),
        return_dict_in_generate=True, **oracle([free[0].tolist()]),
    )
    assert out.sequences.tolist() == reference.tolist()
    assert out.sequences[0, -1].item() == eos
    assert out.speculation.mean_accept_len > 1.5  # the stop really fell inside a multi-token chunk


class _StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_and_custom_criteria(max_new_tokens):
    target = build_tiny_target("qwen2_vl")
    inputs = make_inputs("qwen2_vl", target, with_image=True)
    reference = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    replay = oracle([target.generate(**inputs, max_new_tokens=30, do_sample=False)[0].tolist()])
    draft = _draft(target)
    out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=draft, **replay)
    assert out.tolist() == reference.tolist()
    n_prompt = inputs["input_ids"].shape[1]
    criteria = StoppingCriteriaList([_StopAfter(n_prompt + 4)])
    ref_custom = target.generate(**inputs, max_new_tokens=30, do_sample=False, stopping_criteria=criteria)
    out_custom = target.generate(**inputs, max_new_tokens=30, do_sample=False, stopping_criteria=criteria,
                                 assistant_model=draft, **replay)
    assert out_custom.tolist() == ref_custom.tolist()
    assert out_custom.shape[1] == n_prompt + 4


def test_streamer_receives_every_token():
    target = build_tiny_target("llama")
    inputs = make_inputs("llama", target, with_image=False)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    plain_stream, spec_stream = Collect(), Collect()
    target.generate(**inputs, max_new_tokens=16, do_sample=False, streamer=plain_stream)
    target.generate(**inputs, max_new_tokens=16, do_sample=False, streamer=spec_stream, assistant_model=_draft(target),
                    **oracle([reference[0].tolist()]))
    flat = lambda chunks: [t for chunk in chunks for t in chunk]  # noqa: E731
    assert flat(spec_stream.chunks) == flat(plain_stream.chunks)
    assert spec_stream.ended
    assert len(spec_stream.chunks) < len(plain_stream.chunks)  # tokens arrived in accepted chunks


def test_scores_match_plain_generate():
    target = build_tiny_target("llava")
    inputs = make_inputs("llava", target, with_image=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    plain = target.generate(**inputs, **kwargs)
    spec = target.generate(**inputs, assistant_model=_draft(target), **kwargs)
    assert len(spec.scores) == len(plain.scores) == 10
    for a, b in zip(spec.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(spec.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
