"""The elastic-compressor ablation of `specvlm bench`: several `--compressor-draft NAME=PATH` variants in one run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from specvlm_hf import ElasticCompressorConfig, SpecVLMDraftModel
from specvlm_hf.bench.methods import (
    Method,
    TreeSettings,
    build_methods,
    parse_variant_specs,
    record_label,
)
from specvlm_hf.bench.report import plot_results, render_markdown
from specvlm_hf.bench.runner import (
    RunResult,
    aggregate,
    draft_prefill_costs,
    run_benchmark,
)
from specvlm_hf.cli import main
from specvlm_hf.generation.stats import SpeculationStats
from specvlm_hf.models.compressor_metrics import draft_kv_bytes, draft_prefill_flops

PREFILL_KEYS = ("draft_prefill_ms", "draft_prefill_tokens", "draft_prefill_gflops", "draft_kv_mib")


@pytest.fixture(scope="module")
def pool_draft(tiny_bench_assets, tmp_path_factory):
    """A draft whose compressor always pools (select mode over the single primitive `pool`)."""
    from specvlm_hf.bench.cli import load_target

    target, _ = load_target(str(tiny_bench_assets["target"]), torch.float32, "cpu")
    path = tmp_path_factory.mktemp("pool_variant") / "pool"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        SpecVLMDraftModel.from_target(
            target, compressor_config=ElasticCompressorConfig(mode="select", primitives=["pool"])
        ).save_pretrained(path)
    return path


def _args(assets, out, *extra):
    return [
        "bench", "--target", str(assets["target"]), "--prompts", str(assets["prompts"]), "--dtype", "float32",
        "--max-new-tokens", "6", "--temperature", "0", "--repeats", "1", "--no-calibrate", "--no-progress",
        "--out", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def ablation_run(tiny_bench_assets, pool_draft, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation_out")
    code = main(_args(
        tiny_bench_assets, out, "--draft", str(tiny_bench_assets["draft"]),
        "--methods", "specvlm_tree", "specvlm_tree_compressor",
        "--compressor-draft", f"none={tiny_bench_assets['draft']}", str(pool_draft),  # `pool` from the folder name
    ))
    assert code == 0
    return out


def test_one_record_per_variant_lossless_with_the_tree_knobs_of_specvlm_tree(ablation_run):
    records = json.loads((ablation_run / "results.json").read_text())
    assert [record_label(r) for r in records] == ["generate", "specvlm_tree", "compressor:none", "compressor:pool"]
    tree, none, pool = records[1:]
    assert [r["method"] for r in (none, pool)] == ["specvlm_tree_compressor"] * 2
    assert (none["variant"], pool["variant"]) == ("none", "pool") and tree["variant"] is None
    for record in (tree, none, pool):
        assert record["available"] and record["exact_match"] == 1.0 and record["mean_accept_len"] >= 1.0
        assert all(record[key] > 0 for key in PREFILL_KEYS)
        knobs = (record["tree_top_k"], record["tree_depth"], record["tree_total_tokens"])
        assert knobs == (tree["tree_top_k"], tree["tree_depth"], tree["tree_total_tokens"])
    assert "no compressor" in none["note"] and "'select'" in pool["note"]


def test_pool_variant_shortens_the_draft_prefill(ablation_run):
    records = {record_label(r): r for r in json.loads((ablation_run / "results.json").read_text())}
    none, pool = records["compressor:none"], records["compressor:pool"]
    # the text-only prompt costs the same to both: the difference comes from the two image prompts
    assert pool["draft_prefill_tokens"] < none["draft_prefill_tokens"]
    assert pool["draft_prefill_gflops"] < none["draft_prefill_gflops"]
    assert pool["draft_kv_mib"] < none["draft_kv_mib"]
    assert none["draft_prefill_tokens"] == records["specvlm_tree"]["draft_prefill_tokens"]  # same draft
    assert none["compressor_choices"] == {} and records["generate"]["compressor_choices"] is None
    assert set(pool["compressor_choices"]) == {"pool"} and pool["compressor_choices"]["pool"] >= 2
    assert records["generate"]["draft_prefill_ms"] is None


def test_ablation_table_and_meta(ablation_run):
    markdown = (ablation_run / "results.md").read_text()
    assert "## Ablation: elastic compressor" in markdown
    table = markdown.split("## Ablation: elastic compressor", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| specvlm_tree (reference)", "| `none`", "| `pool`"]
    assert "| pool " in rows[2] and "| no compressor" in rows[1]
    assert "| compressor:pool |" in markdown  # the per-batch-size table labels the variants
    meta = json.loads((ablation_run / "meta.json").read_text())
    assert meta["compressor_drafts"]["none"]["compressor"] is None
    assert meta["compressor_drafts"]["pool"]["compressor"]["primitives"] == ["pool"]
    assert meta["methods"] == ["generate", "specvlm_tree", "specvlm_tree_compressor", "specvlm_tree_compressor"]
    assert (ablation_run / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_compressor_variants_alone_with_generate(tiny_bench_assets, pool_draft, tmp_path):
    """`--methods specvlm_tree_compressor` without a main draft: generate still runs; the first variant's knobs."""
    code = main(_args(
        tiny_bench_assets, tmp_path, "--methods", "specvlm_tree_compressor", "--max-prompts", "1",
        "--compressor-draft", f"none={tiny_bench_assets['draft']}", f"pooled={pool_draft}",
    ))
    assert code == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [record_label(r) for r in records] == ["generate", "compressor:none", "compressor:pooled"]
    assert records[0]["speedup"] == pytest.approx(1.0)
    assert all(r["exact_match"] == 1.0 for r in records)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tree_knobs_used"]["draft"] == "compressor variant none"


def test_parse_variant_specs():
    assert parse_variant_specs(["runs/pool", "ctl=runs/none/", "org/select-draft"]) == [
        ("pool", "runs/pool"), ("ctl", "runs/none/"), ("select-draft", "org/select-draft"),
    ]
    assert parse_variant_specs(["runs/a=b/conv"]) == [("conv", "runs/a=b/conv")]  # `=` inside the path
    with pytest.raises(ValueError, match="more than once.*NAME=PATH"):
        parse_variant_specs(["a/pool", "b/pool"])
    with pytest.raises(ValueError, match="expected PATH or NAME=PATH"):
        parse_variant_specs(["pool="])


class _FakeDraft(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2, dtype=torch.float16)
        self.config = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)


def _stats(tokens: int, seconds: float, choices: dict[str, int]) -> SpeculationStats:
    stats = SpeculationStats(draft_prefill_tokens=tokens, draft_prefill_seconds=seconds, compressor_choices=choices)
    stats.record_cycle(1, 2, 4)
    return stats


def test_draft_prefill_costs_are_means_per_prompt():
    draft = _FakeDraft()
    runs = [
        RunResult("compressor:a", 0.0, 1, 0, 0, 1.0, [[1, 2]], 2, _stats(10, 0.002, {"pool": 1})),
        RunResult("compressor:a", 0.0, 2, 1, 0, 1.0, [[1], [2]], 2, _stats(30, 0.004, {"pool": 1, "prune": 1})),
    ]
    costs = draft_prefill_costs(runs, draft)
    assert costs["draft_prefill_ms"] == pytest.approx(1000 * 0.006 / 3)
    assert costs["draft_prefill_tokens"] == pytest.approx(40 / 3)
    flops = draft_prefill_flops(10, draft.config) + 2 * draft_prefill_flops(15, draft.config)
    assert costs["draft_prefill_gflops"] == pytest.approx(flops / 3 / 1e9)
    assert costs["draft_kv_mib"] == pytest.approx(draft_kv_bytes(40, draft.config, torch.float16) / 3 / 2**20)
    assert costs["compressor_choices"] == {"pool": 2, "prune": 1}
    without_draft = draft_prefill_costs(runs)
    assert without_draft["draft_prefill_gflops"] is None and without_draft["draft_prefill_tokens"] == costs[
        "draft_prefill_tokens"]


def test_variants_are_aggregated_separately_and_labels_must_be_unique():
    draft = _FakeDraft()
    tree = TreeSettings(4, 3, 8)
    methods = build_methods(["specvlm_tree_compressor"], compressor_drafts={"a": draft, "b": draft}, tree=tree)
    assert [m.label for m in methods] == ["generate", "compressor:a", "compressor:b"]
    assert all(m.tree == tree for m in methods[1:])
    runs = [RunResult("generate", 0.0, 1, 0, 0, 2.0, [[1, 2]], 2)]
    runs += [RunResult("compressor:a", 0.0, 1, 0, 0, 1.0, [[1, 2]], 2, _stats(10, 0.001, {}))]
    runs += [RunResult("compressor:b", 0.0, 1, 0, 0, 0.5, [[1, 2]], 2, _stats(4, 0.001, {"pool": 1}))]
    records = {record_label(r): r for r in aggregate(runs, methods, [0.0], 1, {0: [0.1]})}
    assert records["compressor:a"]["speedup"] == pytest.approx(2.0)
    assert records["compressor:b"]["speedup"] == pytest.approx(4.0)
    assert records["compressor:b"]["draft_prefill_tokens"] == 4 and records["compressor:a"]["variant"] == "a"
    with pytest.raises(ValueError, match="unique"):
        run_benchmark(None, None, [], [Method("generate"), Method("specvlm_tree"), Method("specvlm_tree")],
                      SimpleNamespace())


def test_many_variants_render(tmp_path):
    """The report stays readable with the full ablation (nine variants next to the other methods)."""
    variants = ["none", "prune", "pool", "conv", "resampler", "text_only", "select", "weighted", "concat"]
    records = []
    for temperature in (0.0, 1.0):
        for method, variant in [(m, None) for m in ("generate", "prompt_lookup", "assisted", "specvlm_chain",
                                                    "specvlm_tree")] + [("specvlm_tree_compressor", v)
                                                                        for v in variants]:
            records.append({
                "method": method, "variant": variant, "temperature": temperature, "batch_size": 1, "available": True,
                "note": None, "speedup": 1.5, "acceptance_per_depth": [0.5, 0.2] if method.startswith("specvlm")
                else None, "mean_accept_len": 1.7, "draft_prefill_ms": 1.0, "draft_prefill_tokens": 20.0,
                "draft_prefill_gflops": 0.1, "draft_kv_mib": 0.5,
                "compressor_choices": {"pool": 3} if variant not in (None, "none") else {},
            })
    meta = {"calibration": None, "target": "t", "device": "cpu", "dtype": "float32", "date": "now"}
    markdown = render_markdown(records, meta)
    table = markdown.split("## Ablation: elastic compressor", 1)[1]
    assert all(f"| `{v}` |" in table for v in variants)
    assert table.count("specvlm_tree (reference)") == 2
    assert plot_results(records, meta, tmp_path / "results.png").stat().st_size > 0
    assert "Ablation" not in render_markdown([r for r in records if r["variant"] is None], meta)
