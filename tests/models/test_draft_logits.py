"""`SpecVLMDraftModel.forward(logits_mask=...)`: the draft's own head inside forward, with and without compression."""

from __future__ import annotations

import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.models import ElasticCompressorConfig
from specvlm_hf.testing.tiny_models import build_tiny_target

HIDDEN = 64


def _inputs(length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(5)
    return {
        "inputs_embeds": torch.randn(2, length, HIDDEN, generator=generator),
        "target_hidden_states": torch.randn(2, length, HIDDEN, generator=generator),
    }


def test_logits_are_the_head_at_the_selected_positions():
    target = build_tiny_target("llava")
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=40).eval()
    inputs = _inputs()
    mask = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        out = draft(**inputs, logits_mask=mask)
        plain = draft(**inputs)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state) and plain.logits is None
    assert out.logits.shape == (int(mask.sum()), 40)
    assert torch.equal(out.logits, draft.lm_head(out.last_hidden_state[mask]))
    full = SpecVLMDraftModel.from_target(target, draft_vocab_size="full")
    assert full(**inputs, logits_mask=mask).logits is None  # the target's head is not the draft's


def test_logits_follow_the_compressed_positions():
    target = build_tiny_target("llava")
    torch.manual_seed(0)
    config = ElasticCompressorConfig(mode="select", primitives=["pool"], ratios={"pool": 3})
    draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=40, compressor_config=config).eval()
    inputs = {key: value[:1] for key, value in _inputs(20).items()}
    visual = torch.zeros(1, 20, dtype=torch.bool)
    visual[0, 3:12] = True
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, -2:] = False
    with torch.no_grad():
        out = draft(**inputs, visual_mask=visual, grid_sizes=[[(3, 3)]], logits_mask=mask)
    compressed = out.compressor_output
    assert out.last_hidden_state.shape[1] < 20
    kept = (compressed.kept_index >= 0) & compressed.attention_mask.bool()
    selected = mask.gather(1, compressed.kept_index.clamp(min=0)) & kept
    assert torch.equal(out.logits, draft.lm_head(out.last_hidden_state[selected]))
