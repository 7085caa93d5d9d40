"""Real-model checks of the decoding loop on the pocket VLM (slow: `python -m pytest -m slow tests/slow`)."""

from __future__ import annotations

import copy
from importlib.resources import files

import pytest
import torch

from specvlm_hf.generation.exact_attention import probe_exact_verification
from specvlm_hf.pocket import demo_inputs, load_pocket_draft, load_pocket_vlm, pocket_ready

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not pocket_ready(), reason="pocket VLM packages not installed")]


@pytest.fixture(scope="module")
def pocket():
    target, processor = load_pocket_vlm()
    return target, processor


def _inputs(processor, dtype):
    inputs = demo_inputs(processor)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def test_bf16_greedy_equals_plain_on_the_bench_prompts(pocket):
    from specvlm_hf.bench.prompts import load_prompts, render_batch

    from specvlm_hf.demo import choose_dtype, target_linear_shapes

    if not probe_exact_verification("cpu", torch.bfloat16, hidden_size=576).exact:
        pytest.skip("this machine's bf16 kernels fail the exactness probe")
    choice = choose_dtype("auto", "cpu", target_linear_shapes(None))  # the pocket VLM's own projection shapes too
    if choice.dtype != torch.bfloat16:
        pytest.skip(f"bf16 speculation is not bitwise exact for the pocket VLM here: {choice.reason}")
    target, processor = pocket
    target = copy.deepcopy(target).to(torch.bfloat16)
    draft = load_pocket_draft(target)
    prompts = load_prompts(files("specvlm_hf") / "assets/bench/prompts.jsonl")
    for prompt in prompts:
        inputs = render_batch(processor, [prompt], "cpu", torch.bfloat16)
        plain = target.generate(**inputs, max_new_tokens=48, do_sample=False)
        spec = target.generate(**inputs, max_new_tokens=48, do_sample=False, assistant_model=draft,
                               return_dict_in_generate=True)
        assert spec.speculation.exact_verification
        assert spec.sequences.tolist() == plain.tolist(), prompt.source


def test_fp32_multi_turn_continues_from_the_returned_cache(pocket):
    target, processor = pocket
    draft = load_pocket_draft(target)
    inputs = _inputs(processor, torch.float32)
    first = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft,
                            return_dict_in_generate=True)
    follow = processor.tokenizer("\nAnd what colour is it?", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([first.sequences, follow], dim=1)
    turn2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results = []
    for assistant in (None, draft):
        cache = copy.deepcopy(first.past_key_values)
        results.append(target.generate(**turn2, past_key_values=cache, max_new_tokens=24, do_sample=False,
                                       assistant_model=assistant))
    assert results[0].tolist() == results[1].tolist()
