"""`specvlm bench` end to end on tiny saved models, through the `specvlm` entry point."""

from __future__ import annotations

import json
import math

import pytest

from specvlm_hf.bench.methods import METHODS
from specvlm_hf.cli import main

REQUIRED = {
    "method", "temperature", "batch_size", "speedup", "decode_speedup", "mean_accept_len", "mean_accept_len_no_bonus",
    "acceptance_per_depth", "exact_match", "tokens_per_s", "peak_memory_mib", "peak_memory_kind", "available", "note",
}


def _args(assets, out, *extra):
    return [
        "bench", "--target", str(assets["target"]), "--draft", str(assets["draft"]),
        "--prompts", str(assets["prompts"]), "--dtype", "float32", "--max-new-tokens", "6", "--out", str(out),
        "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def full_run(tiny_bench_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    code = main(_args(
        tiny_bench_assets, out, "--compressor-draft", str(tiny_bench_assets["compressor_draft"]),
        "--assistant", "truncated:1", "--batch-size", "1", "2", "--repeats", "2",
        "--pilot-max-new-tokens", "6", "--pilot-budgets", "2", "8", "--max-tree-nodes", "8",
        "--calibration-repeats", "1",
    ))
    assert code == 0
    return out


def test_writes_all_outputs(full_run):
    for name in ("results.json", "meta.json", "results.md", "results.png"):
        assert (full_run / name).is_file() and (full_run / name).stat().st_size > 0
    assert (full_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (full_run / "results.md").read_text()
    assert "## Batch size 1" in markdown and "## Batch size 2" in markdown and "## Tree calibration" in markdown


def test_records_cover_every_method_temperature_and_batch_size(full_run):
    records = json.loads((full_run / "results.json").read_text())
    assert isinstance(records, list)
    keys = {(r["method"], r["temperature"], r["batch_size"]) for r in records}
    assert keys == {(m, t, b) for m in METHODS for t in (0.0, 1.0) for b in (1, 2)}
    for record in records:
        assert REQUIRED <= set(record)
        if record["available"]:
            assert record["speedup"] > 0 and math.isfinite(record["speedup"])
            assert record["peak_memory_mib"] > 0
            if record["temperature"] == 0:
                assert 0 <= record["exact_match"] <= 1
            else:
                assert record["exact_match"] is None
        if record["method"] == "generate":
            assert record["speedup"] == pytest.approx(1.0)


def test_specvlm_methods_are_lossless_and_report_acceptance(full_run):
    records = json.loads((full_run / "results.json").read_text())
    for record in records:
        if not record["method"].startswith("specvlm"):
            continue
        assert record["available"]
        assert record["mean_accept_len"] >= 1.0
        assert 0 <= record["mean_accept_len_no_bonus"] <= record["mean_accept_len"]
        assert isinstance(record["acceptance_per_depth"], list)
        if record["temperature"] == 0:
            assert record["exact_match"] == 1.0
    chain = next(r for r in records if r["method"] == "specvlm_chain")
    assert chain["tree_top_k"] == 1 and chain["tree_depth"] == chain["tree_total_tokens"]


def test_transformers_baselines_run_at_batch_one_and_are_reported_at_batch_two(full_run):
    records = {(r["method"], r["temperature"], r["batch_size"]): r
               for r in json.loads((full_run / "results.json").read_text())}
    for method in ("prompt_lookup", "assisted"):
        single = records[method, 0.0, 1]
        assert single["available"] and single["exact_match"] == 1.0 and single["mean_accept_len"] >= 1.0
        batched = records[method, 0.0, 2]
        assert not batched["available"] and "batch_size = 1" in batched["note"]


def test_meta_and_calibration(full_run):
    meta = json.loads((full_run / "meta.json").read_text())
    for key in ("date", "hardware", "versions", "dtype", "device", "target", "draft", "prompts_file", "repeats"):
        assert meta[key] is not None
    assert meta["versions"]["transformers"] and meta["hardware"]["cpu_count"]
    calibration = meta["calibration"]
    chosen = calibration["chosen"]
    assert meta["tree_knobs_used"]["source"] == "calibrated"
    assert 1 <= chosen["tree_depth"] <= chosen["tree_total_tokens"] <= 8
    records = json.loads((full_run / "results.json").read_text())
    tree = next(r for r in records if r["method"] == "specvlm_tree")
    assert (tree["tree_depth"], tree["tree_total_tokens"]) == (chosen["tree_depth"], chosen["tree_total_tokens"])
    assert tree["calibrated"] is True
    for compressor in (r for r in records if r["method"] == "specvlm_tree_compressor"):  # same knobs: only the
        assert compressor["variant"] == "compressor_draft" and compressor["calibrated"] is True  # compressor differs
        assert (compressor["tree_depth"], compressor["tree_total_tokens"]) == (chosen["tree_depth"],
                                                                             chosen["tree_total_tokens"])
    assert len(calibration["verify_curve"]["sizes"]) == len(calibration["verify_curve"]["seconds"])


def test_compressor_method_is_skipped_without_a_compressor_draft(tiny_bench_assets, tmp_path):
    code = main(_args(tiny_bench_assets, tmp_path, "--methods", "specvlm_tree", "specvlm_tree_compressor",
                      "--temperature", "0", "--repeats", "1", "--no-calibrate", "--max-prompts", "1"))
    assert code == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["generate", "specvlm_tree", "specvlm_tree_compressor"]
    skipped = records[2]
    assert not skipped["available"] and "--compressor-draft" in skipped["note"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["calibration"] is None and meta["tree_knobs_used"]["source"] == "draft config"
    assert "Ablation" not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "extra,error,message",
    [
        (("--methods", "generate", "beam_search"), ValueError, "unknown method"),
        (("--prompts", "/nonexistent/prompts.jsonl"), FileNotFoundError, "does not exist"),
    ],
)
def test_clear_errors(tiny_bench_assets, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(_args(tiny_bench_assets, tmp_path, *extra))


def test_draft_of_another_target_gives_the_library_error(tiny_bench_assets, tmp_path):
    args = _args(tiny_bench_assets, tmp_path)
    args[args.index("--draft") + 1] = str(tiny_bench_assets["other_draft"])
    with pytest.raises(ValueError, match="does not match the target.*vocabulary"):
        main(args)


def test_target_without_draft(tiny_bench_assets, tmp_path):
    args = _args(tiny_bench_assets, tmp_path)
    del args[args.index("--draft") : args.index("--draft") + 2]
    with pytest.raises(ValueError, match="--draft is required"):
        main(args)


def test_text_only_target(tmp_path):
    """A causal LM target loads through the AutoModelForCausalLM + AutoTokenizer fallback."""
    import torch

    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.testing.tiny_models import build_tiny_target
    from specvlm_hf.testing.tiny_processors import build_tiny_tokenizer

    target = build_tiny_target("llama")
    target.save_pretrained(tmp_path / "target")
    build_tiny_tokenizer().save_pretrained(tmp_path / "target")
    with torch.random.fork_rng(devices=[]):
        SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "describe a cat"}\n{"images": [], "prompt": "the red car", "max_new_tokens": 5}\n')
    code = main([
        "bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts),
        "--dtype", "float32", "--max-new-tokens", "6", "--methods", "prompt_lookup", "specvlm_chain", "specvlm_tree",
        "--temperature", "0", "--repeats", "1", "--batch-size", "1", "2", "--no-calibrate", "--no-progress",
        "--out", str(tmp_path / "out"),
    ])
    assert code == 0
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    for record in records:
        if record["method"].startswith("specvlm"):
            assert record["exact_match"] == 1.0
            if record["batch_size"] == 2:
                assert "one after another" in record["note"]
