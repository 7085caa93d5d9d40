# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Tests of the elastic visual compressor (configuration, primitives, modes, gate, positions, save/load, metrics)."""

import ast
import importlib
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from specvlm_hf.models.compressor_metrics import (
    choice_histogram,
    compression_report,
    draft_kv_bytes,
    draft_prefill_flops,
)
from specvlm_hf.models.configuration_elastic_compressor import ElasticCompressorConfig, window_shape
from specvlm_hf.models.configuration_specvlm_draft import SpecVLMDraftConfig
from specvlm_hf.models.modeling_elastic_compressor import (
    CompressorOutput,
    ElasticPrune,
    ElasticVisualCompressor,
    _Windows,
)


HIDDEN = 16
GATE_WIDTH = 12
MODELS_DIR = Path(__file__).resolve().parents[2] / "src" / "specvlm_hf" / "models"


def tiny_config(**overrides) -> ElasticCompressorConfig:
    values = dict(hidden_size=HIDDEN, gate_input_size=GATE_WIDTH, gate_hidden_size=8, resampler_num_heads=2)
    values.update(overrides)
    return ElasticCompressorConfig(**values)


def tiny_compressor(**overrides) -> ElasticVisualCompressor:
    torch.manual_seed(0)
    return ElasticVisualCompressor(tiny_config(**overrides)).eval()


def _segment_length(segment) -> int:
    if isinstance(segment, int):
        return segment
    size = segment[1]
    return size[0] * size[1] if isinstance(size, tuple) else size


def make_batch(layouts, seed: int = 0, padding_side: str = "right"):
    """
    Builds compressor inputs from row layouts. A layout is a list of segments: an `int` (that many text positions),
    `("img", n)` (an image of n positions, 1-D) or `("img", (h, w))` (an image on an h x w grid).

    Returns `(inputs, spans)` with `spans[b] = [(start, length, grid), ...]`.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = [sum(_segment_length(segment) for segment in layout) for layout in layouts]
    batch, seq_len = len(layouts), max(max(lengths), 1)
    visual = torch.zeros(batch, seq_len, dtype=torch.bool)
    image_ids = torch.full((batch, seq_len), -1, dtype=torch.long)
    attention = torch.zeros(batch, seq_len, dtype=torch.long)
    grids, spans = [], []
    for row, layout in enumerate(layouts):
        offset = 0 if padding_side == "right" else seq_len - lengths[row]
        t, image, row_grids, row_spans = offset, 0, [], []
        for segment in layout:
            if isinstance(segment, int):
                t += segment
                continue
            n = _segment_length(segment)
            grid = segment[1] if isinstance(segment[1], tuple) else None
            visual[row, t : t + n] = True
            image_ids[row, t : t + n] = image
            row_grids.append(grid)
            row_spans.append((t, n, grid))
            image, t = image + 1, t + n
        attention[row, offset : offset + lengths[row]] = 1
        grids.append(row_grids)
        spans.append(row_spans)
    inputs = dict(
        fused=torch.randn(batch, seq_len, HIDDEN, generator=generator),
        visual_mask=visual,
        image_ids=image_ids,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        gate_features=torch.randn(batch, seq_len, GATE_WIDTH, generator=generator),
        attention_mask=attention,
        grid_sizes=grids,
    )
    return inputs, spans


def reference_count(config: ElasticCompressorConfig, primitive: str, n: int, grid) -> int:
    """Independent token count: windows of the ratio (rows x cols = ratio on a grid), queries, or nothing."""
    if primitive == "text_only":
        return 0
    if primitive == "resampler":
        return min(config.resampler_queries, n)
    ratio = config.ratio_for(primitive)
    if grid is None or config.grid_mode == "1d":
        return math.ceil(n / ratio)
    rows = max(d for d in range(1, ratio + 1) if ratio % d == 0 and d * d <= ratio)
    return math.ceil(grid[0] / rows) * math.ceil(grid[1] / (ratio // rows))


def check_output(config, inputs, spans, out: CompressorOutput, primitives_per_row):
    """Invariants: counts, order, text preserved bit-exactly, positions = input positions at kept_index."""
    fused, attention = inputs["fused"], inputs["attention_mask"].bool()
    visual = inputs["visual_mask"] & attention
    for row, row_spans in enumerate(spans):
        real = out.attention_mask[row].bool()
        kept = out.kept_index[row][real]
        assert (out.kept_index[row][~real] == -1).all()
        steps = kept[1:] - kept[:-1]
        assert (steps >= 0).all() if config.mode == "concat" else (steps > 0).all()
        positions = out.position_ids[row][real]
        assert torch.equal(positions, inputs["position_ids"][row][kept])
        assert (positions[1:] >= positions[:-1]).all()
        is_text = ~visual[row][kept]
        text_index = (attention[row] & ~visual[row]).nonzero().flatten()
        assert torch.equal(kept[is_text], text_index)
        assert torch.equal(out.fused[row][real][is_text], fused[row, text_index])
        expected_total = 0
        for start, length, grid in row_spans:
            inside = (kept >= start) & (kept < start + length)
            expected = sum(reference_count(config, name, length, grid) for name in primitives_per_row[row])
            assert int(inside.sum()) == expected, (row, start, length, grid, primitives_per_row[row])
            expected_total += expected
        assert int(out.n_visual_out[row]) == expected_total
        assert int(out.n_visual_in[row]) == int(visual[row].sum())
        assert int(real.sum()) == len(text_index) + expected_total


# ------------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_paper():
    config = ElasticCompressorConfig()
    assert config.model_type == "specvlm_elastic_compressor"
    assert config.mode == "select"
    assert config.primitives == ["prune", "pool", "conv", "resampler", "text_only"]
    assert (config.prune_ratio, config.pool_ratio, config.conv_ratio, config.resampler_queries) == (20, 20, 3, 2)
    assert config.prune_strategy == "random" and config.token_cost == 0.0
    assert config.gate_input_size == config.hidden_size == 4096
    assert ElasticCompressorConfig(mode="weighted").primitives == ["prune", "pool", "conv"]
    assert ElasticCompressorConfig(mode="weighted").ratio_for("pool") == 3
    assert ElasticCompressorConfig(mode="concat").primitives == ["prune", "pool", "conv", "resampler"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mode="weighted", primitives=["pool", "resampler"]), "accepts only"),
        (dict(mode="concat", primitives=["pool", "text_only"]), "text_only"),
        (dict(primitives=["pool", "blur"]), "unknown primitives"),
        (dict(primitives=["pool", "pool"]), "must not repeat"),
        (dict(primitives=[]), "at least one"),
        (dict(conv_ratio=0), "conv_ratio must be >= 1"),
        (dict(resampler_num_heads=3), "resampler_num_heads"),
        (dict(gumbel_temperature=0.0), "gumbel_temperature"),
        (dict(token_cost=-0.5), "token_cost"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides", [dict(mode="fastest"), dict(prune_ratio="20"), dict(primitives="pool")])
def test_config_field_types_are_strict(overrides):
    with pytest.raises(Exception, match="Field"):
        tiny_config(**overrides)


def test_config_round_trip_and_for_draft():
    config = tiny_config(mode="concat", pool_ratio=4, prune_strategy="saliency_question", token_cost=0.25)
    again = ElasticCompressorConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    draft = SpecVLMDraftConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, target_hidden_size=48,
                               target_layer_ids=[2, -1])
    for_draft = ElasticCompressorConfig.for_draft(draft, conv_ratio=5)
    assert (for_draft.hidden_size, for_draft.gate_input_size, for_draft.conv_ratio) == (64, 96, 5)


def test_window_shape_factorises_the_ratio():
    assert window_shape(20, two_d=True) == (4, 5)
    assert window_shape(16, two_d=True) == (4, 4)
    assert window_shape(3, two_d=True) == (1, 3)
    assert window_shape(20, two_d=False) == (1, 20)
    for ratio in range(1, 40):
        rows, cols = window_shape(ratio, two_d=True)
        assert rows * cols == ratio and rows <= cols


# ------------------------------------------------------------------------------------------------------------------
# primitives, counts, positions
# ------------------------------------------------------------------------------------------------------------------
PRIMITIVES = ["prune", "pool", "conv", "resampler", "text_only"]


@pytest.mark.parametrize("primitive", PRIMITIVES)
@pytest.mark.parametrize("ratio", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("image", [("img", 37), ("img", (6, 7)), ("img", 2)])
def test_counts_per_primitive_and_ratio(primitive, ratio, image):
    compressor = tiny_compressor(prune_ratio=ratio, pool_ratio=ratio, conv_ratio=ratio, resampler_queries=ratio)
    inputs, spans = make_batch([[4, image, 6]])
    out = compressor(**inputs, force_primitive=primitive)
    check_output(compressor.config, inputs, spans, out, [[primitive]])
    n, grid = spans[0][0][1], spans[0][0][2]
    assert compressor.num_output_tokens(primitive, n, grid) == reference_count(compressor.config, primitive, n, grid)
    if primitive != "text_only":
        assert int(out.n_visual_out[0]) >= 1  # a span shorter than the ratio keeps one token


def test_paper_token_counts_for_llava_1_5():
    compressor = tiny_compressor()
    expected_2d = {"prune": 30, "pool": 30, "conv": 192, "resampler": 2, "text_only": 0}  # 24x24 grid, 4x5 windows
    expected_1d = {"prune": 29, "pool": 29, "conv": 192, "resampler": 2, "text_only": 0}  # 576 tokens in a row
    for name in PRIMITIVES:
        assert compressor.num_output_tokens(name, 576, (24, 24)) == expected_2d[name]
        assert compressor.num_output_tokens(name, 576, None) == expected_1d[name]


def test_several_images_text_only_row_and_padding():
    compressor = tiny_compressor()
    layouts = [[3, ("img", 9), 2, ("img", (4, 5)), ("img", 11), 4], [7], [1, ("img", 25), 1]]
    for padding_side in ("right", "left"):
        inputs, spans = make_batch(layouts, padding_side=padding_side)
        for primitive in PRIMITIVES:
            out = compressor(**inputs, force_primitive=primitive, padding_side=padding_side)
            check_output(compressor.config, inputs, spans, out, [[primitive]] * 3)
            lengths = out.attention_mask.sum(-1)
            assert out.fused.shape[1] == int(lengths.max())
            short = int(lengths.argmin())
            pad_slot = -1 if padding_side == "right" else 0
            if lengths[short] < out.fused.shape[1]:
                assert out.attention_mask[short, pad_slot] == 0 and out.kept_index[short, pad_slot] == -1
                assert (out.fused[short, pad_slot] == 0).all()


def test_text_only_prompt_passes_through_unchanged():
    compressor = tiny_compressor()
    inputs, _ = make_batch([[12]])
    out = compressor(**inputs)
    assert torch.equal(out.fused, inputs["fused"])
    assert torch.equal(out.position_ids, inputs["position_ids"])
    assert torch.equal(out.kept_index[0], torch.arange(12))
    assert out.choice.shape == (1,) and 0 <= int(out.choice[0]) < 5
    assert int(out.n_visual_in[0]) == int(out.n_visual_out[0]) == 0
    assert float(out.expected_kept_fraction.detach()[0]) == 0.0


def test_ratio_one_pooling_is_the_identity():
    compressor = tiny_compressor(pool_ratio=1)
    inputs, _ = make_batch([[3, ("img", 10), 4, ("img", (3, 3)), 2]])
    out = compressor(**inputs, force_primitive="pool")
    assert torch.equal(out.fused, inputs["fused"])
    assert torch.equal(out.position_ids, inputs["position_ids"])


def test_kept_index_rule_per_primitive():
    compressor = tiny_compressor(pool_ratio=4, prune_ratio=4, conv_ratio=4, resampler_queries=3)
    inputs, _ = make_batch([[2, ("img", 10), 3]])  # image at positions 2..11
    visual_kept = {}
    for primitive in PRIMITIVES:
        out = compressor(**inputs, force_primitive=primitive)
        kept = out.kept_index[0]
        visual_kept[primitive] = kept[(kept >= 2) & (kept <= 11)].tolist()
        if primitive == "prune":  # pruned tokens are copies of the tokens they keep
            rows = (kept >= 2) & (kept <= 11)
            assert torch.equal(out.fused[0][rows], inputs["fused"][0, kept[rows]])
    assert visual_kept["pool"] == visual_kept["conv"] == [5, 9, 11]  # last token of each window of 4
    assert visual_kept["resampler"] == [9, 10, 11]  # the span's last positions
    assert visual_kept["text_only"] == []
    assert len(visual_kept["prune"]) == 3


def test_two_d_window_sources_are_bottom_right_patches():
    compressor = tiny_compressor(pool_ratio=4)  # 2x2 windows
    inputs, _ = make_batch([[1, ("img", (3, 5)), 1]])  # image at positions 1..15
    out = compressor(**inputs, force_primitive="pool")
    kept = out.kept_index[0].tolist()
    # windows: rows {0,1},{2}; cols {0,1},{2,3},{4}; bottom-right (r, c) -> 1 + 5 r + c
    assert kept == [0] + [1 + 5 * r + c for r in (1, 2) for c in (1, 3, 4)] + [16]
    grid = inputs["fused"][0, 1:16].reshape(3, 5, HIDDEN)
    assert torch.allclose(out.fused[0, 1], grid[:2, :2].reshape(-1, HIDDEN).mean(0), atol=1e-6)
    assert torch.allclose(out.fused[0, 6], grid[2, 4], atol=1e-6)  # a 1-token edge window


def test_untrained_conv_equals_pooling_and_resampler_equals_mean():
    compressor = tiny_compressor(mode="concat", primitives=["pool", "conv", "resampler"], pool_ratio=3, conv_ratio=3)
    x = torch.randn(35, HIDDEN)
    for grid in (None, (5, 7)):
        windows = _Windows.of(35, grid, 3)
        pooled, pooled_source = compressor.branches["pool"](x, windows)
        conved, conved_source = compressor.branches["conv"](x, windows)
        assert torch.allclose(pooled, conved, atol=1e-6)
        assert torch.equal(pooled_source, conved_source)
    resampled, _ = compressor.branches["resampler"](x)
    assert torch.allclose(resampled, x.mean(0).expand(2, -1), atol=1e-6)


def test_stratified_prune_keeps_one_token_per_window():
    windows = _Windows.of(20, (4, 5), 4)  # 2x2 windows over a 4x5 grid
    x = torch.arange(20, dtype=torch.float32)[:, None]
    membership = windows.membership(torch.device("cpu"))
    for strategy, scores in (("random", None), ("saliency_norm", torch.rand(20)), ("stride", None)):
        tokens, source = ElasticPrune()(x, windows, strategy, True, scores=scores,
                                        generator=torch.Generator().manual_seed(1))
        picked = tokens[:, 0].long()
        assert torch.equal(membership[picked], torch.arange(windows.count))
        assert torch.equal(source, windows.last(torch.device("cpu")))


@pytest.mark.parametrize("strategy", ["random", "stride", "saliency_norm", "saliency_question"])
def test_prune_strategies_are_deterministic_at_inference(strategy):
    compressor = tiny_compressor(prune_strategy=strategy, prune_ratio=4)
    inputs, spans = make_batch([[5, ("img", 30), 3, ("img", (4, 4)), 2]])
    first = compressor(**inputs, force_primitive="prune")
    second = compressor(**inputs, force_primitive="prune")
    assert torch.equal(first.fused, second.fused) and torch.equal(first.kept_index, second.kept_index)
    check_output(compressor.config, inputs, spans, first, [["prune"]])


def test_saliency_norm_keeps_the_largest_features():
    compressor = tiny_compressor(prune_strategy="saliency_norm", prune_ratio=5)
    inputs, _ = make_batch([[2, ("img", 10), 2]])
    inputs["gate_features"][0, 2:12] = 0.01
    inputs["gate_features"][0, [4, 9]] = 5.0
    out = compressor(**inputs, force_primitive="prune")
    kept = out.kept_index[0]
    assert kept[(kept >= 2) & (kept < 12)].tolist() == [4, 9]


def test_input_errors_are_explicit():
    compressor = tiny_compressor()
    inputs, _ = make_batch([[2, ("img", 6), 2]])
    with pytest.raises(ValueError, match="grid_sizes gives"):
        compressor(**{**inputs, "grid_sizes": [[(2, 2)]]})
    broken = dict(inputs, image_ids=inputs["image_ids"].clone())
    broken["visual_mask"] = inputs["visual_mask"].clone()
    broken["visual_mask"][0, 9] = True
    broken["image_ids"][0, 9] = 0
    with pytest.raises(ValueError, match="non-contiguous"):
        compressor(**broken)
    with pytest.raises(ValueError, match="gate_features"):
        compressor(**{**inputs, "gate_features": None})
    with pytest.raises(ValueError, match="not one of the configured"):
        compressor(**inputs, force_primitive="blur")


def test_image_ids_default_to_runs_and_grid_mode_1d_ignores_grids():
    compressor = tiny_compressor(pool_ratio=4, grid_mode="1d")
    inputs, spans = make_batch([[2, ("img", (3, 4)), 1, ("img", 5), 2]])
    with_ids = compressor(**inputs, force_primitive="pool")
    without_ids = compressor(**{**inputs, "image_ids": None}, force_primitive="pool")
    assert torch.equal(with_ids.fused, without_ids.fused)
    check_output(compressor.config, inputs, spans, with_ids, [["pool"]])
    assert int(with_ids.n_visual_out[0]) == 3 + 2


# ------------------------------------------------------------------------------------------------------------------
# modes and gate
# ------------------------------------------------------------------------------------------------------------------
def test_select_gate_is_deterministic_in_eval():
    compressor = tiny_compressor()
    inputs, _ = make_batch([[4, ("img", 40), 6], [3, ("img", (5, 6)), 8]], seed=3)
    first, second = compressor(**inputs), compressor(**inputs)
    assert torch.equal(first.choice, second.choice)
    assert torch.equal(first.fused, second.fused)
    assert torch.equal(first.choice, first.gate_logits.argmax(-1))
    assert torch.allclose(first.gate_probs.sum(-1), torch.ones(2))


def test_select_gate_is_stochastic_in_training():
    compressor = tiny_compressor().train()
    inputs, _ = make_batch([[4, ("img", 12), 6]])
    choices = {int(compressor(**inputs).choice[0]) for _ in range(40)}
    assert len(choices) > 1
    seeded = [int(compressor(**inputs, generator=torch.Generator().manual_seed(7)).choice[0]) for _ in range(2)]
    assert seeded[0] == seeded[1]


def _gate_grad_norm(compressor) -> float:
    return sum(float(p.grad.abs().sum()) for p in compressor.gate.parameters() if p.grad is not None)


def test_select_training_sends_task_gradients_to_the_gate():
    compressor = tiny_compressor(primitives=["prune", "pool", "conv", "resampler"]).train()
    inputs, spans = make_batch([[4, ("img", 12), 6], [2, ("img", (3, 4)), 3]])
    fused = inputs["fused"].clone().requires_grad_(True)
    out = compressor(**{**inputs, "fused": fused})
    names = compressor.config.primitives
    check_output(compressor.config, inputs, spans, out, [[names[int(c)]] for c in out.choice])
    (out.fused.pow(2) * out.attention_mask[..., None]).sum().backward()
    assert _gate_grad_norm(compressor) > 0
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_token_cost_term_is_differentiable():
    compressor = tiny_compressor(token_cost=0.1)
    inputs, _ = make_batch([[4, ("img", 40), 6]])
    out = compressor(**inputs)
    counts = torch.tensor([compressor.num_output_tokens(name, 40) for name in compressor.config.primitives]) / 40
    assert torch.allclose(out.expected_kept_fraction, (out.gate_probs * counts).sum(-1))
    (compressor.config.token_cost * out.expected_kept_fraction.mean()).backward()
    assert _gate_grad_norm(compressor) > 0


def test_weighted_mode_sums_aligned_primitives_and_trains_the_gate():
    compressor = tiny_compressor(mode="weighted", weighted_ratio=3).train()
    inputs, spans = make_batch([[4, ("img", 14), 6], [1, ("img", (3, 6)), 2, ("img", 4)]])
    out = compressor(**inputs)
    check_output(compressor.config, inputs, spans, out, [["pool"], ["pool"]])
    assert torch.equal(out.choice, out.gate_probs.argmax(-1))
    out.fused.pow(2).sum().backward()
    assert _gate_grad_norm(compressor) > 0
    compressor.eval()
    pooled = tiny_compressor(pool_ratio=3)(**inputs, force_primitive="pool")
    assert torch.equal(compressor(**inputs).kept_index, pooled.kept_index)


def test_concat_mode_keeps_every_branch():
    compressor = tiny_compressor(mode="concat")
    inputs, spans = make_batch([[4, ("img", 45), 6], [3, ("img", (6, 8)), 2]])
    out = compressor(**inputs)
    check_output(compressor.config, inputs, spans, out, [compressor.config.primitives] * 2)
    assert out.gate_logits.shape == (2, 0) and (out.choice == -1).all()
    histogram = choice_histogram(out.choice, compressor.config)
    assert histogram == {"prune": 0, "pool": 0, "conv": 0, "resampler": 0, "none": 2}


def test_bfloat16_forward():
    compressor = tiny_compressor().to(torch.bfloat16)
    inputs, spans = make_batch([[4, ("img", 12), 6]])
    inputs["fused"] = inputs["fused"].bfloat16()
    inputs["gate_features"] = inputs["gate_features"].bfloat16()
    for primitive in PRIMITIVES:
        out = compressor(**inputs, force_primitive=primitive)
        assert out.fused.dtype == torch.bfloat16
        check_output(compressor.config, inputs, spans, out, [[primitive]])


# ------------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    AutoConfig.register(ElasticCompressorConfig.model_type, ElasticCompressorConfig, exist_ok=True)
    AutoModel.register(ElasticCompressorConfig, ElasticVisualCompressor, exist_ok=True)
    compressor = tiny_compressor(mode="concat", conv_ratio=2, prune_strategy="saliency_question")
    with torch.no_grad():  # move away from the structured initialisation so loading cannot pass by re-initialising
        for parameter in compressor.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    compressor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is ElasticVisualCompressor
    saved, reloaded_config = compressor.config.to_dict(), loaded.config.to_dict()
    saved.pop("_name_or_path"), reloaded_config.pop("_name_or_path")
    assert reloaded_config == saved
    original, reloaded = compressor.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    inputs, _ = make_batch([[4, ("img", 30), 6], [2, ("img", (4, 4)), 1]])
    first, second = compressor(**inputs), loaded(**inputs)
    assert torch.equal(first.fused, second.fused) and torch.equal(first.kept_index, second.kept_index)


def test_modeling_files_are_self_contained(tmp_path):
    allowed = {"torch", "transformers", "huggingface_hub", "math", "dataclasses", "typing", "collections"}
    for name in ("configuration_elastic_compressor.py", "modeling_elastic_compressor.py"):
        tree = ast.parse((MODELS_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {node.module.split(".")[0]} if node.level == 0 else set()
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"
    # the two files work as a package of their own (what `auto_map` remote code does)
    package = tmp_path / "elastic_remote_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_elastic_compressor.py", "modeling_elastic_compressor.py"):
        shutil.copy(MODELS_DIR / name, package / name)
    sys.path.insert(0, str(tmp_path))
    try:
        remote = importlib.import_module("elastic_remote_pkg.modeling_elastic_compressor")
        config = remote.ElasticCompressorConfig(hidden_size=HIDDEN, gate_input_size=GATE_WIDTH, gate_hidden_size=8)
        model = remote.ElasticVisualCompressor(config).eval()
        inputs, _ = make_batch([[3, ("img", 9), 2]])
        assert model(**inputs).fused.shape[-1] == HIDDEN
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith("elastic_remote_pkg")]:
            del sys.modules[module]


# ------------------------------------------------------------------------------------------------------------------
# property tests
# ------------------------------------------------------------------------------------------------------------------
_image = st.one_of(
    st.integers(1, 30).map(lambda n: ("img", n)),
    st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda hw: ("img", hw)),
)
_row = st.tuples(
    st.integers(0, 4), st.lists(st.tuples(_image, st.integers(0, 4)), max_size=3)
).map(lambda row: [row[0]] + [segment for image, gap in row[1] for segment in (image, gap)])
_layouts = st.lists(_row, min_size=1, max_size=3).filter(lambda rows: any(_segment_length(s) for r in rows for s in r))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layouts=_layouts,
    mode=st.sampled_from(["select", "weighted", "concat"]),
    ratio=st.integers(1, 7),
    queries=st.integers(1, 4),
    strategy=st.sampled_from(["random", "stride", "saliency_norm", "saliency_question"]),
    primitive=st.sampled_from(PRIMITIVES),
    padding_side=st.sampled_from(["right", "left"]),
)
def test_random_layouts_counts_and_order(layouts, mode, ratio, queries, strategy, primitive, padding_side):
    overrides = dict(mode=mode, prune_ratio=ratio, pool_ratio=ratio + 1, conv_ratio=ratio, weighted_ratio=ratio,
                     resampler_queries=queries, prune_strategy=strategy)
    compressor = tiny_compressor(**overrides)
    inputs, spans = make_batch(layouts, padding_side=padding_side)
    batch = len(layouts)
    if mode == "select":
        out = compressor(**inputs, force_primitive=primitive, padding_side=padding_side)
        per_row = [[primitive]] * batch
    else:
        out = compressor(**inputs, padding_side=padding_side)
        per_row = [["pool"]] * batch if mode == "weighted" else [compressor.config.primitives] * batch
    check_output(compressor.config, inputs, spans, out, per_row)


# ------------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------------
def test_flops_and_kv_helpers_are_monotone():
    draft = SpecVLMDraftConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    flops = [draft_prefill_flops(n, draft) for n in range(0, 300, 7)]
    kv = [draft_kv_bytes(n, draft, torch.float16) for n in range(0, 300, 7)]
    assert flops[0] == 0 and all(a < b for a, b in zip(flops, flops[1:]))
    assert kv[0] == 0 and all(a < b for a, b in zip(kv, kv[1:]))
    # 2 (k, v) * 1 layer * 10 tokens * 2 kv heads * 16 head_dim * 2 bytes
    assert draft_kv_bytes(10, draft, torch.bfloat16) == 2 * 1 * 10 * 2 * 16 * 2
    assert draft_kv_bytes(10, draft, "float32") == 2 * draft_kv_bytes(10, draft, torch.bfloat16)
    report = compression_report(600, 60, draft)
    assert report["flops_ratio"] < 0.2 and report["kv_ratio"] == pytest.approx(0.1)


def test_choice_histogram_counts_by_name():
    config = tiny_config()
    histogram = choice_histogram(torch.tensor([0, 4, 4, 1, 4]), config)
    assert histogram == {"prune": 1, "pool": 1, "conv": 0, "resampler": 0, "text_only": 3}
    assert choice_histogram([2, 2], ["pool", "conv", "text_only"]) == {"pool": 0, "conv": 0, "text_only": 2}
    with pytest.raises(ValueError, match="out of range"):
        choice_histogram([9], config)
