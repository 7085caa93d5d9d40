"""A draft with an elastic visual compressor keeps greedy output token-identical to plain `generate`.

The compressor only changes what the draft sees in its prefill: these tests check that for every primitive and mode,
that the draft really sees fewer tokens (`draft_prefill_tokens`), and that the gate's choice is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation.visual_layout import image_grids, visual_token_ids
from specvlm_hf.models import ElasticCompressorConfig
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs

MAX_NEW = 12

# Tiny LLaVA rows hold one image of 9 tokens laid out as a 3 x 3 grid. Visual tokens the draft keeps per image with
# the default ratios: prune / pool at 20 -> one 4 x 5 window; conv at 3 -> 1 x 3 windows -> 3; two resampler queries;
# weighted mode runs prune / pool / conv at 3 -> 3; concat keeps every branch.
LLAVA_IMAGE_TOKENS = 9
LLAVA_CASES = [
    ("select", ["prune"], 1),
    ("select", ["pool"], 1),
    ("select", ["conv"], 3),
    ("select", ["resampler"], 2),
    ("select", ["text_only"], 0),
    ("weighted", ["prune"], 3),
    ("weighted", ["pool"], 3),
    ("weighted", ["conv"], 3),
    ("weighted", None, 3),
    ("concat", ["prune"], 1),
    ("concat", ["pool"], 1),
    ("concat", ["conv"], 3),
    ("concat", ["resampler"], 2),
    ("concat", None, 7),
]


@pytest.fixture(scope="module")
def targets():
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny_target(family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def references(targets):
    cache: dict[tuple[str, int, bool], tuple[dict, torch.Tensor]] = {}

    def get(family: str, batch_size: int, with_image: bool = True):
        key = (family, batch_size, with_image)
        if key not in cache:
            target = targets(family)
            inputs = make_inputs(family, target, with_image=with_image, batch_size=batch_size)
            cache[key] = (inputs, target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False))
        return cache[key]

    return get


def _draft(target, **compressor_fields) -> SpecVLMDraftModel:
    torch.manual_seed(1)
    return SpecVLMDraftModel.from_target(target, compressor_config=ElasticCompressorConfig(**compressor_fields))


def _speculate(target, draft, inputs):
    # a fixed tree: the adaptive rule sizes trees from wall-clock timings, which would make drafting differ by run
    return target.generate(
        **inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft, return_dict_in_generate=True,
        tree_adaptive=False,
    )


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("mode,primitives,kept", LLAVA_CASES)
def test_llava_every_primitive_and_mode_is_lossless(targets, references, mode, primitives, kept, batch_size):
    target = targets("llava")
    inputs, reference = references("llava", batch_size)
    draft = _draft(target, mode=mode, primitives=primitives)
    out = _speculate(target, draft, inputs)
    assert out.sequences.tolist() == reference.tolist()
    stats = out.speculation
    assert stats.draft_prefill_tokens == stats.prefill_tokens - batch_size * (LLAVA_IMAGE_TOKENS - kept)
    assert stats.draft_prefill_tokens < stats.prefill_tokens
    names = draft.compressor.config.primitives
    if mode == "concat":  # no gate: every row is counted under "none"
        assert stats.compressor_choices == {**dict.fromkeys(names, 0), "none": batch_size}
    elif len(names) == 1:
        assert stats.compressor_choices == {names[0]: batch_size}
    else:
        assert sum(stats.compressor_choices.values()) == batch_size


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "gemma3"])
def test_default_mode_is_lossless_across_families(targets, references, family, batch_size):
    target = targets(family)
    inputs, reference = references(family, batch_size)
    draft = _draft(target)
    out = _speculate(target, draft, inputs)
    assert out.sequences.tolist() == reference.tolist()
    stats = out.speculation
    assert stats.draft_prefill_tokens < stats.prefill_tokens
    assert set(stats.compressor_choices) == set(draft.compressor.config.primitives)
    assert sum(stats.compressor_choices.values()) == batch_size


def test_gate_is_deterministic_and_leaves_the_module_mode_alone(targets, references):
    target = targets("llava")
    inputs, reference = references("llava", 2)
    draft = _draft(target, mode="select", prune_strategy="random").train()  # training mode would draw Gumbel noise
    runs = [_speculate(target, draft, inputs) for _ in range(2)]
    assert all(run.sequences.tolist() == reference.tolist() for run in runs)
    assert runs[0].speculation.compressor_choices == runs[1].speculation.compressor_choices
    assert runs[0].speculation.accepted_per_cycle == runs[1].speculation.accepted_per_cycle
    assert draft.compressor.training


def test_identity_compression_drafts_exactly_like_no_compression(targets, references):
    # pooling windows of one token reproduce the fused inputs and positions, so the draft proposes the same trees
    target = targets("llava")
    inputs, reference = references("llava", 2)
    torch.manual_seed(1)
    plain = SpecVLMDraftModel.from_target(target)
    identity = _draft(target, primitives=["pool"], pool_ratio=1)
    identity.load_state_dict(plain.state_dict(), strict=False)
    expected, got = _speculate(target, plain, inputs), _speculate(target, identity, inputs)
    assert got.sequences.tolist() == expected.sequences.tolist() == reference.tolist()
    assert got.speculation.accepted_per_cycle == expected.speculation.accepted_per_cycle
    assert got.speculation.draft_prefill_tokens == expected.speculation.draft_prefill_tokens


@pytest.mark.parametrize("with_compressor,with_image", [(False, True), (True, False)])
def test_draft_sees_every_token_without_compressor_or_image(targets, references, with_compressor, with_image):
    target = targets("llava")
    inputs, reference = references("llava", 2, with_image)
    torch.manual_seed(1)
    draft = _draft(target) if with_compressor else SpecVLMDraftModel.from_target(target)
    out = _speculate(target, draft, inputs)
    assert out.sequences.tolist() == reference.tolist()
    assert out.speculation.draft_prefill_tokens == out.speculation.prefill_tokens
    assert out.speculation.compressor_choices == {}


@pytest.mark.parametrize(
    "family,expected",
    [
        ("llava", [[(3, 3)], [(3, 3)]]),
        ("gemma3", [[(2, 2)], [(2, 2)]]),
        ("idefics3", [[(2, 2)], [(2, 2)]]),
        ("llava_next", [[None], [None]]),  # unpadded crops with image-newline tokens: compressed as a sequence
    ],
)
def test_image_grids_of_square_and_sequence_layouts(targets, family, expected):
    target = targets(family)
    inputs = make_inputs(family, target, with_image=True, batch_size=2)
    mask = inputs["attention_mask"]
    paired = [inputs["input_ids"][r, int((mask[r] == 0).sum()) + 1 :] for r in range(2)]
    visual_ids = visual_token_ids(target)
    assert target.config.get_text_config().vocab_size - 1 in visual_ids
    assert image_grids(target.config.model_type, paired, visual_ids) == expected


def test_qwen_image_grids_come_from_mrope_positions(targets, references):
    # rows hold 2 x 2 and 2 x 3 merged-patch images; pooling windows of 1 x 2 keep 2 + 4 tokens on those grids and
    # ceil(4 / 2) + ceil(6 / 2) = 2 + 3 tokens along the sequence
    target = targets("qwen2_vl")
    inputs, reference = references("qwen2_vl", 2)
    removed = {}
    for grid_mode in ("auto", "1d"):
        draft = _draft(target, primitives=["pool"], pool_ratio=2, grid_mode=grid_mode)
        out = _speculate(target, draft, inputs)
        assert out.sequences.tolist() == reference.tolist()
        removed[grid_mode] = out.speculation.prefill_tokens - out.speculation.draft_prefill_tokens
    assert removed == {"auto": (4 - 2) + (6 - 4), "1d": (4 - 2) + (6 - 3)}
