"""The tiny random targets of `specvlm_hf.testing`: deterministic, varied, batch-invariant and really multimodal."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf.testing import (
    FAMILIES,
    MULTIMODAL_FAMILIES,
    TEXT_FAMILIES,
    build_tiny_target,
    make_inputs,
    reserved_token_ids,
    split_rows,
)

MAX_NEW = 24
IMAGE_CASES = [
    (family, with_image)
    for family in FAMILIES
    for with_image in ((False, True) if family in MULTIMODAL_FAMILIES else (False,))
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # models this small only lose from intra-op parallelism, badly so on a loaded CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def targets():
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(family: str, attn_implementation: str = "sdpa"):
        key = (family, attn_implementation)
        if key not in cache:
            cache[key] = build_tiny_target(family, attn_implementation=attn_implementation)
        return cache[key]

    return get


def _new_tokens(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    return sequences[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_seeded(targets, family):
    model = targets(family)
    state = model.state_dict()
    rng_before = torch.get_rng_state()
    same = build_tiny_target(family).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not consume the caller's RNG"
    assert state.keys() == same.keys()
    assert all(torch.equal(state[name], same[name]) for name in state)
    head = model.get_output_embeddings().weight
    other = build_tiny_target(family, seed=1)
    assert not torch.equal(head, other.get_output_embeddings().weight)
    half = build_tiny_target(family, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.get_output_embeddings().weight, head.to(torch.bfloat16))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_setup(targets, family):
    model = targets(family)
    assert not model.training
    assert isinstance(model.get_input_embeddings(), torch.nn.Module)
    assert isinstance(model.get_output_embeddings(), torch.nn.Module)
    config = model.generation_config
    ids = reserved_token_ids(model.config.get_text_config().vocab_size)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (ids["pad"], ids["bos"], ids["eos"])
    assert not config.do_sample and config.top_k is None and config.top_p is None and config.temperature is None
    eager = targets(family, "eager")
    assert eager.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family,with_image", IMAGE_CASES)
def test_forward_hidden_states_and_attention_parity(targets, family, with_image):
    model = targets(family)
    inputs = make_inputs(family, model, with_image=with_image, batch_size=2)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        eager = targets(family, "eager")(**inputs)
    assert len(out.hidden_states) == model.config.get_text_config().num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (*inputs["input_ids"].shape, model.config.get_text_config().hidden_size)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], eager.logits[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family,with_image", IMAGE_CASES)
def test_batch_rows_equal_their_batch_one_runs(targets, family, with_image, attn_implementation):
    model = targets(family, attn_implementation)
    inputs = make_inputs(family, model, with_image=with_image, batch_size=2)
    assert inputs["attention_mask"].sum(-1).unique().numel() == 2, "rows must have different lengths"
    assert (inputs["attention_mask"][:, 0] == 0).any(), "left padding expected"
    with torch.no_grad():
        batched = _new_tokens(inputs, model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False))
        rows = split_rows(family, inputs)
        for row, row_inputs in enumerate(rows):
            single = _new_tokens(row_inputs, model.generate(**row_inputs, max_new_tokens=MAX_NEW, do_sample=False))
            assert batched[row, : single.shape[1]].tolist() == single[0].tolist()
    # row 0 of a batch is the batch_size=1 input of the same seed
    alone = make_inputs(family, model, with_image=with_image, batch_size=1)
    assert alone.keys() == rows[0].keys()
    assert all(torch.equal(alone[key], rows[0][key]) for key in alone)


@pytest.mark.parametrize("family,with_image", IMAGE_CASES)
def test_generate_is_varied_and_full_length(targets, family, with_image):
    model = targets(family)
    eos = model.generation_config.eos_token_id
    lengths, distinct = [], []
    for seed in range(3):
        inputs = make_inputs(family, model, with_image=with_image, seed=seed)
        with torch.no_grad():
            new = _new_tokens(inputs, model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False))[0].tolist()
        assert len(new) == MAX_NEW or new[-1] == eos
        assert eos not in new[:-1]
        lengths.append(len(new))
        distinct.append(len(set(new)))
    assert max(lengths) == MAX_NEW
    assert max(distinct) >= 8, "greedy output of a tiny target should not collapse to a few tokens"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_are_not_flat(targets, family):
    model = targets(family)
    inputs = make_inputs(family, model, with_image=family in MULTIMODAL_FAMILIES, batch_size=2, prompt_len=12)
    with torch.no_grad():
        logits = model(**inputs).logits[inputs["attention_mask"].bool()]
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert (gaps > 1e-3).float().mean() > 0.9
    assert logits.std(-1).mean() > 0.5


@pytest.mark.parametrize("family", MULTIMODAL_FAMILIES)
def test_image_is_consumed(targets, family):
    model = targets(family)
    inputs = make_inputs(family, model, with_image=True, batch_size=2)
    other_pixels = make_inputs(family, model, with_image=True, batch_size=2, seed=1)
    swapped = {key: other_pixels[key] if key.startswith("pixel") else value for key, value in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        swapped_logits = model(**swapped).logits[:, -1]
    assert ((logits - swapped_logits).abs().amax(-1) > 0.1).all()


@pytest.mark.parametrize("family", MULTIMODAL_FAMILIES)
def test_placeholder_layout(targets, family):
    model = targets(family)
    ids = reserved_token_ids(model.config.get_text_config().vocab_size)
    inputs = make_inputs(family, model, with_image=True, batch_size=2)
    text_only = make_inputs(family, model, with_image=False, batch_size=2)
    for row_ids in (*inputs["input_ids"], *text_only["input_ids"]):
        assert not (row_ids == ids["eos"]).any()
    assert not (text_only["input_ids"] == ids["image"]).any()
    counts = (inputs["input_ids"] == ids["image"]).sum(-1)
    assert (counts > 0).all()
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            assert torch.equal(inputs[key].bool(), inputs["input_ids"] == ids["image"])


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_only_family_rejects_images(targets, family):
    with pytest.raises(ValueError, match="text-only"):
        make_inputs(family, targets(family), with_image=True)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_target("blip2")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_target("llama", vocab_size=8)
