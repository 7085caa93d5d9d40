"""Real Gemma-3-270M (262,144-token vocabulary) with an untrained draft: reduced head by default, lossless, cheap steps.

Needs the PyPI packages of `specvlm_hf.testing.gemma3_270m` (Gemma Terms of Use; skipped without them). Run with
`python -m pytest -m slow tests/slow/test_gemma3_270m.py` (≈2 minutes on 2 CPU cores, plus a one-time conversion
of ≈90 s).
"""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.models import AUTO_DRAFT_VOCAB_SIZE
from specvlm_hf.testing.gemma3_270m import (
    GEMMA3_270M_MISSING,
    gemma3_270m_available,
    load_gemma3_270m,
    measure_step_costs,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not gemma3_270m_available(), reason=GEMMA3_270M_MISSING)]

#: Regression bound on one draft expansion step (8 rows) relative to one target decode step (the issue's goal: 0.05;
#: see `test_draft_step_is_a_small_fraction_of_a_target_step`).
MAX_STEP_RATIO = 0.08

PROMPT = "The history of the Roman Empire begins"


@pytest.fixture(scope="module")
def gemma():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the conftest's single thread suits tiny models, not a 270M one
    model, tokenizer = load_gemma3_270m()
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(model).eval()
    yield model, tokenizer, draft
    torch.set_num_threads(threads)


def _greedy(model, inputs, max_new_tokens, **kwargs):
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def test_default_draft_head_is_reduced(gemma):
    model, tokenizer, draft = gemma
    assert model.config.vocab_size == 262144
    assert draft.config.draft_vocab_size == AUTO_DRAFT_VOCAB_SIZE
    assert draft.lm_head.weight.shape == (AUTO_DRAFT_VOCAB_SIZE, model.config.hidden_size)
    kept = set(draft.d2t.tolist())
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} <= kept
    # SentencePiece puts single characters at the top of Gemma's id range; the head-row prior brings them in
    for piece in [".", ",", "\n", "▁the", "▁of"]:
        assert tokenizer.convert_tokens_to_ids(piece) in kept, piece
    torch.testing.assert_close(draft.lm_head.weight, model.get_output_embeddings().weight[draft.d2t])


@pytest.mark.parametrize("knobs", [{}, {"tree_top_k": 4, "tree_depth": 2, "tree_total_tokens": 4}], ids=["defaults", "small"])
def test_greedy_equals_plain_generate(gemma, knobs):
    model, tokenizer, draft = gemma
    inputs = tokenizer(PROMPT, return_tensors="pt")
    reference = _greedy(model, inputs, 32)
    out = _greedy(model, inputs, 32, assistant_model=draft, **knobs)
    assert out.tolist() == reference.tolist()


def test_prompt_longer_than_the_sliding_window(gemma):
    model, tokenizer, draft = gemma
    window = model.config.sliding_window
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : window + 100]
    assert ids.shape[1] > window
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reference = _greedy(model, inputs, 24)
    out = _greedy(model, inputs, 24, assistant_model=draft)
    assert out.tolist() == reference.tolist()


def test_left_padded_batch_of_two(gemma):
    model, tokenizer, draft = gemma
    tokenizer.padding_side = "left"
    inputs = tokenizer([PROMPT, "def fibonacci(n):\n    "], return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    reference = _greedy(model, inputs, 24)
    out = _greedy(model, inputs, 24, assistant_model=draft)
    assert out.tolist() == reference.tolist()


def test_draft_step_does_not_grow_with_the_vocabulary(gemma):
    model, _, draft = gemma
    tiny = SpecVLMDraftModel.from_target(model, draft_vocab_size=64).eval()
    full = SpecVLMDraftModel.from_target(model, draft_vocab_size="full").eval()
    with_default = measure_step_costs(model, draft, blocks=6)["draft_step_ms"]
    with_tiny = measure_step_costs(model, tiny, blocks=6)["draft_step_ms"]
    with_full = measure_step_costs(model, full, blocks=3)["draft_step_ms"]
    # the default head adds a fraction of the decoder layer's cost; the full 262,144-row head costs many layers
    assert with_default <= 1.5 * with_tiny, (with_default, with_tiny)
    assert with_default <= 0.1 * with_full, (with_default, with_full)


def test_draft_step_is_a_small_fraction_of_a_target_step(gemma):
    """
    The issue's goal is a draft expansion step of at most 0.05 of a target decode step. With the default 2,048-id head
    the head adds about 0.01; the draft's decoder layer alone costs 0.04-0.055 of a target step on the 2-core
    reference CPU, depending on the load of the shared cores, so the whole step measures 0.047 (idle) to 0.07 (loaded):
    this guards against regressions (the full head measured 1.5) and leaves the 0.05 goal to the report.
    """
    model, _, draft = gemma
    # a load on the machine only slows things down: the best of a few measurements is the estimate
    ratios = []
    for _ in range(3):
        ratios.append(measure_step_costs(model, draft)["ratio"])
        if ratios[-1] <= MAX_STEP_RATIO:
            break
    assert min(ratios) <= MAX_STEP_RATIO, ratios
