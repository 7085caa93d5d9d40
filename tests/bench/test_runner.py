"""The measurement protocol: interleaved order, memory probe, and aggregation into records."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from specvlm_hf.bench.methods import (
    Method,
    TreeSettings,
    build_methods,
    check_method_names,
)
from specvlm_hf.bench.runner import (
    BenchSettings,
    PeakMemory,
    RunResult,
    aggregate,
    interleaved_schedule,
    rotated,
)
from specvlm_hf.generation.stats import SpeculationStats

METHODS = ["generate", "prompt_lookup", "assisted", "specvlm_tree"]


def test_schedule_runs_every_method_once_per_repetition_batch_and_temperature():
    schedule = interleaved_schedule(METHODS, n_units=3, repeats=2, temperatures=(0.0, 1.0))
    assert len(schedule) == 2 * 3 * 2 * len(METHODS)
    per_cell = collections.defaultdict(list)
    for item in schedule:
        per_cell[(item.repeat, item.unit, item.temperature)].append(item.method)
    assert len(per_cell) == 12
    assert all(sorted(names) == sorted(METHODS) for names in per_cell.values())
    for repeat in range(2):  # each repetition covers each method
        assert {i.method for i in schedule if i.repeat == repeat} == set(METHODS)
    # calls of one (repetition, batch) are contiguous: methods are interleaved prompt by prompt
    keys = [(i.repeat, i.unit) for i in schedule]
    assert keys == sorted(keys)


def test_schedule_rotates_the_order():
    schedule = interleaved_schedule(METHODS, n_units=1, repeats=len(METHODS))
    firsts = [next(i.method for i in schedule if i.repeat == r) for r in range(len(METHODS))]
    assert firsts == METHODS  # every method goes first once
    assert rotated(METHODS, 5) == METHODS[1:] + METHODS[:1]
    assert rotated([], 3) == []


def test_method_names_and_baseline():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['beam'\]"):
        check_method_names(["generate", "beam"])
    methods = build_methods(["specvlm_tree", "specvlm_tree_compressor", "assisted"])
    assert [m.name for m in methods] == ["generate", "specvlm_tree", "specvlm_tree_compressor", "assisted"]
    assert not any(m.available for m in methods[1:])
    assert "--compressor-draft" in methods[2].note and "--assistant" in methods[3].note


def test_settings_validation():
    with pytest.raises(ValueError, match="temperatures"):
        BenchSettings(temperatures=[-1.0])
    with pytest.raises(ValueError, match="batch sizes"):
        BenchSettings(batch_sizes=[0])
    with pytest.raises(ValueError, match="repeats"):
        BenchSettings(repeats=0)


def test_peak_memory_probe_reports_bytes():
    import torch

    probe = PeakMemory(torch.device("cpu"))
    baseline = probe.reset()
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[:: 4096] = b"x" * len(block[:: 4096])
    peak = probe.read()
    assert peak > 0 and baseline > 0
    if probe.kind == "cpu_peak_rss":
        assert peak - baseline >= 32 * 2**20
    del block


def _run(method, temperature, unit, repeat, seconds, outputs, forwards, stats=None):
    return RunResult(method, temperature, 1, unit, repeat, seconds, outputs, forwards, stats, 100 * 2**20, 2**20)


def test_aggregate_ratios_acceptance_and_exact_match():
    stats = SpeculationStats()
    stats.record_cycle(2, 3, 8)
    stats.record_cycle(0, 1, 8)
    methods = [Method("generate"), Method("prompt_lookup"), Method("specvlm_tree", tree=TreeSettings(8, 4, 16))]
    runs = []
    for temperature in (0.0, 1.0):
        for unit in (0, 1):
            runs.append(_run("generate", temperature, unit, 0, 2.0, [[5, 6, 7, 8, 9]], 5))
            runs.append(_run("prompt_lookup", temperature, unit, 0, 1.0, [[5, 6, 7, 8, 9]], 3))
            other = [[5, 6, 7, 8, 9]] if unit == 0 else [[5, 6, 1]]
            runs.append(_run("specvlm_tree", temperature, unit, 0, 0.5, other, 3, stats))
    records = aggregate(runs, methods, [0.0, 1.0], 1, {0: [0.5, 0.7, 0.5], 1: [0.5]})
    by = {(r["method"], r["temperature"]): r for r in records}
    plain, lookup, tree = by["generate", 0.0], by["prompt_lookup", 0.0], by["specvlm_tree", 0.0]
    assert plain["speedup"] == 1.0 and plain["mean_accept_len"] == 1.0 and plain["exact_match"] == 1.0
    assert lookup["speedup"] == pytest.approx(2.0)
    assert lookup["decode_speedup"] == pytest.approx((4.0 - 1.0) / (2.0 - 1.0))  # ttft 0.5 per batch subtracted
    assert lookup["mean_accept_len"] == pytest.approx(8 / 4)  # (5 - 1) tokens per (3 - 1) verifications, per call
    assert lookup["mean_accept_len_no_bonus"] == pytest.approx(1.0) and lookup["acceptance_per_depth"] is None
    assert tree["speedup"] == pytest.approx(4.0) and tree["tree_total_tokens"] == 16
    assert tree["mean_accept_len"] == pytest.approx(2.0) and tree["mean_accept_len_no_bonus"] == pytest.approx(1.0)
    assert tree["acceptance_per_depth"] == [0.5, 0.5, 0.0, 0.0]  # padded to the tree depth
    assert tree["exact_match"] == 0.5 and tree["identical_to_generate"] == 0.5
    assert by["specvlm_tree", 1.0]["exact_match"] is None  # not defined when sampling
    assert by["specvlm_tree", 1.0]["identical_to_generate"] == 0.5
    assert tree["tokens_per_s"] == pytest.approx(8 / 1.0) and tree["peak_memory_mib"] == pytest.approx(100.0)
    assert tree["peak_memory_increase_mib"] == pytest.approx(1.0)


def test_speedup_on_identical_calls_is_like_for_like():
    """Only calls whose output equals plain generate's count; a diverging call that ran long or short does not."""
    methods = [Method("generate"), Method("prompt_lookup")]
    runs = [_run("generate", 0.0, unit, 0, 2.0, [[5, 6, 7]], 3) for unit in (0, 1, 2)]
    runs += [_run("prompt_lookup", 0.0, 0, 0, 1.0, [[5, 6, 7]], 2),  # identical, 2x
             _run("prompt_lookup", 0.0, 1, 0, 0.25, [[5, 9]], 2),  # diverged and stopped early: not counted
             _run("prompt_lookup", 0.0, 2, 0, 0.5, [[5, 6, 7]], 2)]  # identical, 4x
    by = {r["method"]: r for r in aggregate(runs, methods, [0.0], 1, {})}
    lookup = by["prompt_lookup"]
    assert lookup["speedup"] == pytest.approx(6.0 / 1.75)
    assert lookup["speedup_identical_calls"] == pytest.approx(4.0 / 1.5) and lookup["identical_calls"] == 2
    assert by["generate"]["speedup_identical_calls"] == 1.0 and by["generate"]["identical_calls"] == 3
    assert lookup["call_seconds"] == [[0, 0, 1.0, 2.0, True], [0, 1, 0.25, 2.0, False], [0, 2, 0.5, 2.0, True]]
    sampled = aggregate([dataclasses.replace(r, temperature=1.0) for r in runs], methods, [1.0], 1, {})
    assert sampled[1]["speedup_identical_calls"] is None and sampled[1]["identical_calls"] is None
    assert [call[4] for call in sampled[1]["call_seconds"]] == [None, None, None]


def test_like_for_like_compares_methods_on_the_calls_all_reproduced():
    from specvlm_hf.bench.report import common_identical_speedups, render_markdown

    methods = [Method("generate"), Method("prompt_lookup"), Method("specvlm_chain")]
    runs = [_run("generate", 0.0, unit, 0, 2.0, [[5, 6, 7]], 3) for unit in (0, 1, 2)]
    runs += [_run("prompt_lookup", 0.0, 0, 0, 1.0, [[5, 6, 7]], 2), _run("prompt_lookup", 0.0, 1, 0, 0.5, [[5, 6, 7]], 2),
             _run("prompt_lookup", 0.0, 2, 0, 0.1, [[5, 1]], 2)]
    runs += [_run("specvlm_chain", 0.0, 0, 0, 0.5, [[5, 6, 7]], 2), _run("specvlm_chain", 0.0, 1, 0, 0.1, [[5, 9]], 2),
             _run("specvlm_chain", 0.0, 2, 0, 1.0, [[5, 6, 7]], 2)]
    records = aggregate(runs, methods, [0.0], 1, {})
    common, total, speedups = common_identical_speedups(records)[1]
    assert (common, total) == (1, 3)  # only call 0 is identical for every method
    assert speedups == {"generate": 1.0, "prompt_lookup": pytest.approx(2.0), "specvlm_chain": pytest.approx(4.0)}
    assert common_identical_speedups([r for r in records if r["method"] == "generate"]) == {}  # nothing diverged
    for r in records:
        r["divergences"] = []
    text = render_markdown(records, {"dtype": "bfloat16"})
    assert "on the 1 of 3 calls that every method reproduced exactly" in text and "specvlm_chain 4.00×" in text


def test_aggregate_keeps_methods_that_did_not_run():
    methods = [Method("generate"), Method("assisted", available=False, note="no assistant")]
    skipped = Method("prompt_lookup")
    skipped.unsupported_batch_sizes[2] = "assisted generate is only supported for batch_size = 1"
    runs = [RunResult("generate", 0.0, 2, 0, 0, 1.0, [[1], [2]], 2)]
    records = aggregate(runs, [*methods, skipped], [0.0], 2, {0: [0.1]})
    by = {r["method"]: r for r in records}
    assert by["assisted"]["available"] is False and by["assisted"]["speedup"] is None
    assert by["assisted"]["note"] == "no assistant"
    assert by["prompt_lookup"]["available"] is False and "batch_size = 1" in by["prompt_lookup"]["note"]
    assert by["generate"]["mean_accept_len"] is None  # not defined from a forward count at batch size > 1
