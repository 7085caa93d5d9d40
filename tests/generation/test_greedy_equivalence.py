"""Greedy output with a SpecVLM draft equals plain greedy `generate`, token for token, for every target family."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf.testing.tiny_models import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs, split_rows

from .oracle import oracle

CASES = [
    (family, with_image, batch_size)
    for family in FAMILIES
    for with_image in ((False, True) if family in MULTIMODAL_FAMILIES else (False,))
    for batch_size in (1, 2)
]
MAX_NEW = 24


def _unpadded_rows(inputs: dict, sequences: torch.Tensor) -> list[list[int]]:
    mask = inputs["attention_mask"]
    n_prompt = mask.shape[1]
    rows = []
    for r in range(sequences.shape[0]):
        prompt = inputs["input_ids"][r][mask[r].bool()].tolist()
        rows.append(prompt + sequences[r, n_prompt:].tolist())
    return rows


@pytest.mark.parametrize("draft_kind", ["random", "oracle"])
@pytest.mark.parametrize("family,with_image,batch_size", CASES)
def test_greedy_matches_plain_generate(targets, family, with_image, batch_size, draft_kind):
    target, draft = targets(family)
    inputs = make_inputs(family, target, with_image=with_image, batch_size=batch_size)
    reference = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    replay = oracle(_unpadded_rows(inputs, reference)) if draft_kind == "oracle" else {}
    out = target.generate(
        **inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, return_dict_in_generate=True,
        **replay,
    )
    assert out.sequences.tolist() == reference.tolist()
    stats = out.speculation
    assert stats.target_forwards >= 1
    assert stats.mean_accept_len >= 1.0
    if draft_kind == "oracle":
        # the oracle's chain is always right, so every cycle accepts several tokens
        assert stats.mean_accept_len > 3.0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "idefics3"])
def test_batch_rows_equal_their_batch_one_runs(targets, family):
    target, draft = targets(family)
    inputs = make_inputs(family, target, with_image=True, batch_size=2)
    batched = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft)
    n_prompt = inputs["input_ids"].shape[1]
    for r, row_inputs in enumerate(split_rows(family, inputs)):
        single = target.generate(**row_inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft)
        assert batched[r, n_prompt:].tolist()[: single.shape[1] - row_inputs["input_ids"].shape[1]] == single[
            0, row_inputs["input_ids"].shape[1] :
        ].tolist()


def test_tree_knobs_per_call_override_config(targets):
    target, draft = targets("llava")
    inputs = make_inputs("llava", target, with_image=True)
    reference = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    out = target.generate(
        **inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, return_dict_in_generate=True,
        tree_top_k=2, tree_depth=3, tree_total_tokens=5,
    )
    assert out.sequences.tolist() == reference.tolist()
    assert out.speculation.drafted_tokens <= 5 * out.speculation.target_forwards
    assert draft.config.tree_total_tokens != 5  # the draft's own config is untouched


@pytest.mark.parametrize("head_mode", ["row", "block", "model"])
@pytest.mark.parametrize("family", FAMILIES)
def test_verification_head_modes_match_plain_generate(targets, monkeypatch, family, head_mode):
    """Every way of computing verification logits: one row per walked slot or every slot in one head call (CPU), or
    inside the model's forward (accelerators, or where the head cannot be reproduced)."""
    from specvlm_hf.generation import loop

    monkeypatch.setattr(loop, "head_mode_for", lambda head, dtype: head_mode if head is not None else "model")
    target, draft = targets(family)
    inputs = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES)
    reference = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft,
                          **oracle(_unpadded_rows(inputs, reference)))
    assert out.tolist() == reference.tolist()


def test_lazy_head_reproduces_the_models_own_logits():
    """The lazily applied head is checked against the model's logits: it follows soft-capping where the model applies
    it, ignores a cap the model does not apply, and is refused (eager verification) when nothing matches."""
    from specvlm_hf.generation.logits_head import SlotLogits, find_logits_head

    target = build_tiny_target("gemma3")
    text = target.config.get_text_config()
    text.final_logit_softcapping = 0.5  # set in the config, but Gemma3ForConditionalGeneration does not apply it
    inputs = make_inputs("gemma3", target, with_image=True)
    out = target(**inputs, output_hidden_states=True, return_dict=True)
    final = out.hidden_states[text.num_hidden_layers]
    head = find_logits_head(target, final[:, -1:], out.logits[:, -1])
    assert head is target.get_output_embeddings()
    eager = SlotLogits(out.logits[0], final[0], None, "model")
    for mode in ("row", "block"):
        lazy = SlotLogits(out.logits[0, :1], final[0], head, mode)
        for slot in (0, 3, inputs["input_ids"].shape[1] - 1):
            torch.testing.assert_close(lazy[slot], out.logits[0, slot : slot + 1].float(), rtol=1e-5, atol=1e-5)
            assert lazy.argmax(slot) == eager.argmax(slot)
        fresh = SlotLogits(out.logits[0, :1], final[0], head, mode)  # argmax read before any row
        slots = range(inputs["input_ids"].shape[1])
        assert [fresh.argmax(slot) for slot in slots] == [eager.argmax(slot) for slot in slots]

    capped = torch.tanh(out.logits / 0.5) * 0.5  # what a model that applies the cap returns
    capped_head = find_logits_head(target, final[:, -1:], capped[:, -1])
    assert capped_head is not None and capped_head is not target.get_output_embeddings()
    torch.testing.assert_close(capped_head(final[:, 2:3])[0], capped[:, 2], rtol=1e-5, atol=1e-5)
    assert find_logits_head(target, final[:, -1:], out.logits[:, -1] * 3.0) is None  # unknown post-processing


@pytest.mark.parametrize("family,with_image,batch_size", [c for c in CASES if c[1] or c[0] not in MULTIMODAL_FAMILIES])
def test_a_bfloat16_draft_beside_a_float32_target_is_lossless(targets, family, with_image, batch_size):
    """The draft only proposes: a bf16 copy of it (cheaper steps on CPUs with bf16 units, `specvlm bench
    --draft-dtype`) leaves the float32 target's greedy output unchanged, with and without the batched route."""
    import copy

    target, draft = targets(family)
    draft = copy.deepcopy(draft).to(torch.bfloat16)
    inputs = make_inputs(family, target, with_image=with_image, batch_size=batch_size)
    reference = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    for batched in ((True, False) if batch_size > 1 else (True,)):
        out = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft,
                              tree_batched=batched)
        assert out.tolist() == reference.tolist()
