"""The exactness audit (divergences from plain `generate`, noise floor), the time accounting and the oracle bound."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf.bench.cli import expected_record_keys
from specvlm_hf.bench.exactness import (
    PlainReference,
    find_divergences,
    first_difference,
    measure_noise_floor,
    top2_margins,
)
from specvlm_hf.bench.methods import Method, TreeSettings, build_methods, record_label
from specvlm_hf.bench.runner import (BenchSettings, RunResult, aggregate, oracle_bound, plain_decode_step_seconds,
                                     record_key, time_fractions)
from specvlm_hf.generation.stats import SpeculationStats
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a prefix differs where it ends
    assert first_difference([], []) is None


def test_top2_margins_per_row_and_position():
    logits = (torch.tensor([[1.0, 3.0, 2.5], [0.0, 0.0, 4.0]]), torch.tensor([[5.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    assert top2_margins(logits) == [[0.5, 4.0], [4.0, 0.0]]
    assert top2_margins(()) == []


def test_plain_reference_matches_plain_generate_and_strips_padding():
    target = build_tiny_target("llava")
    inputs = make_inputs("llava", target, with_image=True, batch_size=2)
    assert not inputs["attention_mask"].all()  # left padded
    reference = PlainReference.run(target, inputs, 6)
    plain = target.generate(**inputs, max_new_tokens=6, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    assert reference.rows == [row[n_prompt:] for row in plain.tolist()]  # no eos in the tiny config
    for row, keep in enumerate(inputs["attention_mask"].bool()):
        assert reference.prompts[row] == inputs["input_ids"][row][keep].tolist()
        assert reference.replay[row] == reference.prompts[row] + reference.rows[row]
        assert len(reference.margins[row]) == 6 and all(m >= 0 for m in reference.margins[row])
    assert reference.margin(0, 6) is None and reference.margin(1, 0) == reference.margins[1][0]


def _reference(rows, margins=None):
    return PlainReference(rows=rows, margins=margins or [[0.5] * len(r) for r in rows], prompts=[[1]] * len(rows))


def test_find_divergences_one_entry_per_row():
    references = {0: _reference([[5, 6, 7], [8, 9]], [[1.0, 2.0, 0.03], [4.0, 5.0]]), 1: _reference([[3, 4]])}
    calls = [
        (0, [[5, 6, 1], [8, 9]]),  # repetition 0: row 0 differs at token 2
        (0, [[5, 6, 2], [8, 9]]),  # repetition 1: the same row again
        (1, [[3, 4]]),
        (1, [[9, 4]]),
    ]
    divergences = find_divergences(calls, references, batch_size=2)
    assert divergences == [
        {"prompt": 0, "row": 0, "first_diff": 2, "margin": 0.03, "diverging_runs": 2},
        {"prompt": 2, "row": 0, "first_diff": 0, "margin": 0.5, "diverging_runs": 1},
    ]
    assert find_divergences([(0, [[5, 6, 7], [8, 9]])], references, 2) == []


def _stats(target_seconds, draft_seconds, total_seconds, prefill_seconds=0.0, cycles=((2, 3),), exact=True):
    stats = SpeculationStats(target_seconds=target_seconds, draft_seconds=draft_seconds, total_seconds=total_seconds,
                             target_prefill_seconds=prefill_seconds, exact_verification=exact)
    for accepted, emitted in cycles:
        stats.record_cycle(accepted, emitted, 4)
    return stats


def test_time_fractions_are_time_weighted_and_sum_to_one():
    fractions = time_fractions([_stats(1.0, 0.5, 2.0), _stats(6.0, 1.0, 8.0)])
    assert fractions == pytest.approx({"target_forward": 0.7, "draft": 0.15, "loop": 0.15})
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert time_fractions([SpeculationStats()]) is None


def _run(method, unit, seconds, outputs, stats=None):
    return RunResult(method, 0.0, 1, unit, 0, seconds, outputs, 3, stats, 2**20, 0)


def test_aggregate_divergences_time_fractions_and_exact_verification():
    methods = [Method("generate"), Method("specvlm_tree", tree=TreeSettings(8, 3, 8)), Method("prompt_lookup")]
    references = {0: _reference([[5, 6, 7]], [[1.0, 2.0, 0.25]]), 1: _reference([[4, 4]])}
    runs = [
        _run("generate", 0, 2.0, [[5, 6, 7]]), _run("generate", 1, 2.0, [[4, 4]]),
        _run("specvlm_tree", 0, 1.0, [[5, 6, 9]], _stats(0.6, 0.2, 1.0)),
        _run("specvlm_tree", 1, 1.0, [[4, 4]], _stats(0.5, 0.3, 1.0, exact=False)),
        _run("prompt_lookup", 0, 1.0, [[5, 6, 7]]), _run("prompt_lookup", 1, 1.0, [[4, 4]]),
    ]
    records = {r["method"]: r for r in aggregate(runs, methods, [0.0], 1, {0: [0.1], 1: [0.1]},
                                                 references=references)}
    assert records["generate"]["divergences"] == [] and records["prompt_lookup"]["divergences"] == []
    tree = records["specvlm_tree"]
    assert tree["divergences"] == [{"prompt": 0, "row": 0, "first_diff": 2, "margin": 0.25, "diverging_runs": 1}]
    assert tree["exact_match"] == 0.5
    assert tree["time_fractions"] == pytest.approx({"target_forward": 0.55, "draft": 0.25, "loop": 0.2})
    assert tree["exact_verification"] is False  # not every call verified exactly
    assert records["prompt_lookup"]["time_fractions"] is None and records["prompt_lookup"]["exact_verification"] is None
    no_reference = aggregate(runs, methods, [0.0], 1, {0: [0.1]})
    assert all(r["divergences"] is None for r in no_reference)  # not audited without a reference


def test_oracle_bound_and_fraction():
    # plain: 2 calls of 1.1 s with a 0.1 s time to first token, 11 tokens each -> 0.1 s per decoded token
    plain = [_run("generate", u, 1.1, [list(range(11))]) for u in (0, 1)]
    oracle_runs = [_run("oracle:depth4", u, 0.5, [list(range(11))]) for u in (0, 1)]
    # 4 verification forwards emitting 5 tokens each (tau = 5), 0.2 s each after a 0.1 s prefill
    stats = _stats(0.9, 0.0, 1.0, prefill_seconds=0.1, cycles=[(4, 5)] * 4)
    values = oracle_bound(list(zip(oracle_runs, plain)), stats, {0: 0.1, 1: 0.1}, speedup=2.2, decode_speedup=2.5)
    assert values["t_token_seconds"] == pytest.approx(0.1) and values["t_verify_seconds"] == pytest.approx(0.2)
    assert values["bound"] == pytest.approx(5 * 0.1 / 0.2)
    assert values["fraction_of_bound"] == pytest.approx(2.2 / 2.5)
    assert values["decode_fraction_of_bound"] == pytest.approx(1.0)
    # end to end: 2.2 s of plain time against 2 x 0.1 s of prefill + 0.8 s of verification
    assert values["end_to_end_bound"] == pytest.approx(2.2 / 1.0)
    assert values["fraction_of_end_to_end_bound"] == pytest.approx(2.2 / 2.2)
    empty = oracle_bound([], SpeculationStats(), {}, None, None)
    assert all(value is None for value in empty.values())


def test_plain_decode_step_counts_one_step_per_token_of_the_longest_row():
    # batch 2: rows of 11 and 6 tokens -> 10 decode steps after the first token, 1.0 s after a 0.1 s first token
    batched = [(None, _run("generate", 0, 1.1, [list(range(11)), list(range(6))]))]
    assert plain_decode_step_seconds(batched, {0: 0.1}) == pytest.approx(0.1)
    single = [(None, _run("generate", u, 1.1, [list(range(11))])) for u in (0, 1)]
    assert plain_decode_step_seconds(single, {0: 0.1, 1: 0.1}) == pytest.approx(0.1)
    assert plain_decode_step_seconds([(None, _run("generate", 0, 0.1, [[5]]))], {0: 0.1}) is None  # nothing decoded


def test_oracle_records_per_depth_and_only_at_temperature_zero():
    draft = object()
    methods = build_methods(["oracle"], oracle_draft=draft, oracle_depths=[2, 4, 2])
    oracles = [m for m in methods if m.is_oracle]
    assert [(m.oracle_depth, m.label, m.tree) for m in oracles] == [
        (2, "oracle:depth2", TreeSettings(2, 2, 4)), (4, "oracle:depth4", TreeSettings(2, 4, 8))]
    assert oracles[0].generate_kwargs == {"assistant_model": draft, "tree_top_k": 2, "tree_depth": 2,
                                          "tree_total_tokens": 4, "tree_adaptive": False, "tree_ngram_tokens": 0}
    assert oracles[0].runs_at_temperature(0.0) and not oracles[0].runs_at_temperature(1.0)
    records = aggregate([], [methods[0], *oracles], [1.0], 1, {})
    skipped = [r for r in records if r["method"] == "oracle"]
    assert all(not r["available"] and "temperature 0 only" in r["note"] for r in skipped)
    assert [record_label(r) for r in skipped] == ["oracle:depth2", "oracle:depth4"]
    assert not build_methods(["oracle"], oracle_depths=[3])[1].available  # nothing to route it through


def test_exact_verification_choice_reaches_every_specvlm_method_only():
    draft = object()
    names = ["prompt_lookup", "specvlm_chain", "specvlm_tree", "oracle"]
    for choice in (True, False):
        methods = build_methods(names, draft=type("D", (), {"config": _DraftConfig()})(), oracle_draft=draft,
                                oracle_depths=[2], exact_verification=choice)
        assert {m.label: m.generate_kwargs.get("exact_verification") for m in methods} == {
            "generate": None, "prompt_lookup": None, "specvlm_chain": choice, "specvlm_tree": choice,
            "oracle:depth2": choice}
    assert all("exact_verification" not in m.generate_kwargs
               for m in build_methods(names, draft=type("D", (), {"config": _DraftConfig()})()))


class _DraftConfig:
    tree_top_k, tree_depth, tree_total_tokens = 4, 3, 8


def test_record_keys_identify_oracle_depths():
    assert record_key({"method": "oracle", "oracle_depth": 4, "temperature": 0, "batch_size": 1}) == (
        "oracle", None, 4, 0.0, 1)
    assert record_key({"method": "generate", "temperature": 0, "batch_size": 2}) == (  # records written before
        "generate", None, None, 0.0, 2)
    keys = expected_record_keys(["generate", "oracle", "specvlm_tree"], [], BenchSettings(temperatures=[0.0]),
                                oracle_depths=[2, 6])
    assert keys == {("generate", None, None, 0.0, 1), ("specvlm_tree", None, None, 0.0, 1),
                    ("oracle", None, 2, 0.0, 1), ("oracle", None, 6, 0.0, 1)}


def test_noise_floor_compares_reduced_precision_with_a_float32_copy():
    target = build_tiny_target("llava")
    inputs = [make_inputs("llava", target, with_image=image) for image in (True, False)]
    assert measure_noise_floor(target, inputs, [5, 5], {}, 1) is None  # float32: no noise floor
    target = target.to(torch.bfloat16)
    inputs = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()} for batch in inputs]
    references = {u: PlainReference.run(target, batch, 5) for u, batch in enumerate(inputs)}
    floor = measure_noise_floor(target, inputs, [5, 5], references, 1)
    assert target.dtype == torch.bfloat16  # the copy was converted, not the target
    assert {k: floor[k] for k in ("dtype", "reference", "batch_size", "prompts")} == {
        "dtype": "bfloat16", "reference": "float32", "batch_size": 1, "prompts": 2}
    assert floor["diverging_prompts"] == len(floor["divergences"]) and floor["rate"] == floor["diverging_prompts"] / 2
    full = target.to(torch.float32)
    for entry in floor["divergences"]:
        batch = {k: v.float() if v.is_floating_point() else v for k, v in inputs[entry["prompt"]].items()}
        rows = PlainReference.run(full, batch, 5).rows
        assert first_difference(rows[0], references[entry["prompt"]].rows[0]) == entry["first_diff"]
        assert "margin" in entry and "margin_float32" in entry
