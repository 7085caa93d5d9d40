"""The output folder of `specvlm bench`: checked before any model loads, results saved as they finish (atomically),
kept on an interrupt, completed by `--resume`, never overwritten silently."""

from __future__ import annotations

import json
import tempfile

import pytest

from specvlm_hf.bench import cli as bench_cli
from specvlm_hf.bench import runner
from specvlm_hf.bench.report import prepare_output_dir, write_json_atomic
from specvlm_hf.cli import main
from specvlm_hf.errors import UserValueError

from .conftest import bench_args, user_error_line

# two methods, two temperatures, one prompt, one repetition: four records in two groups (T=0, then T=1)
SMALL = ("--methods", "generate", "prompt_lookup", "--temperature", "0", "1", "--repeats", "1", "--max-prompts", "1",
         "--no-calibrate")


def test_out_that_is_a_file_is_refused_before_loading(tiny_bench_assets, tmp_path, capsys, no_model_load):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    line = user_error_line(bench_args(tiny_bench_assets, out, *SMALL), capsys)
    assert f"--out {out} is a file, not a folder" in line
    assert out.read_text() == "not a folder"


def test_out_that_cannot_be_created_is_refused_before_loading(tiny_bench_assets, tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "sub"
    assert f"--out {out}: cannot create the folder" in user_error_line(bench_args(tiny_bench_assets, out, *SMALL),
                                                                       capsys)


def test_unwritable_out_is_refused_before_loading(tiny_bench_assets, tmp_path, capsys, no_model_load, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only folder does (chmod does not stop root, so simulate it)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = user_error_line(bench_args(tiny_bench_assets, tmp_path / "out", *SMALL), capsys)
    assert f"--out {tmp_path / 'out'} is not writable (Permission denied)" in line


def test_existing_results_are_never_overwritten_without_resume(tiny_bench_assets, tmp_path, capsys, no_model_load):
    earlier = json.dumps([{"method": "generate", "temperature": 0.0, "batch_size": 1, "speedup": 1.0}])
    (tmp_path / "results.json").write_text(earlier)
    line = user_error_line(bench_args(tiny_bench_assets, tmp_path, *SMALL), capsys)
    assert "already holds results; pass --resume" in line and "or choose another --out" in line
    assert (tmp_path / "results.json").read_text() == earlier
    (tmp_path / "results.json").write_text("[]\n")  # an empty list (a run that finished nothing) is no result
    prepare_output_dir(tmp_path)
    (tmp_path / "results.json").write_text("garbage")  # not ours: never overwritten either
    with pytest.raises(UserValueError, match="already holds results"):
        prepare_output_dir(tmp_path)


def test_resume_refuses_a_results_file_that_is_not_ours(tiny_bench_assets, tmp_path, capsys, no_model_load):
    (tmp_path / "results.json").write_text('{"speedup": 2}')
    line = user_error_line(bench_args(tiny_bench_assets, tmp_path, *SMALL, "--resume"), capsys)
    assert "is not a list of specvlm bench records" in line


def test_json_is_replaced_atomically(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, [{"a": float("nan")}])
    assert json.loads(path.read_text()) == [{"a": None}]
    with pytest.raises(TypeError):  # fails half-way through: the previous content stays, no temporary file is left
        write_json_atomic(path, [{"a": 1}, {"b": object()}])
    assert json.loads(path.read_text()) == [{"a": None}]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_meta_and_an_empty_results_file_are_written_before_the_models_load(tiny_bench_assets, tmp_path, monkeypatch):
    seen = {}

    def measure(args, names, variant_specs, settings, prompts, out, meta, records, done):
        seen["results"] = json.loads((out / "results.json").read_text())
        seen["meta"] = json.loads((out / "meta.json").read_text())

    monkeypatch.setattr(bench_cli, "_measure", measure)
    assert main(bench_args(tiny_bench_assets, tmp_path, *SMALL)) == 0
    assert seen["results"] == []
    assert seen["meta"]["status"] == "loading models" and seen["meta"]["settings"]["repeats"] == 1


def test_interrupt_keeps_finished_records_and_resume_runs_only_the_rest(tiny_bench_assets, tmp_path, capsys,
                                                                        monkeypatch):
    original = runner._Caller.call
    calls = []

    def interrupted_at_t1(self, method, inputs, temperature, max_new_tokens, seed, **kwargs):
        if temperature > 0:
            raise KeyboardInterrupt  # Ctrl-C during the second group
        return original(self, method, inputs, temperature, max_new_tokens, seed, **kwargs)

    monkeypatch.setattr(runner._Caller, "call", interrupted_at_t1)
    assert main(bench_args(tiny_bench_assets, tmp_path, *SMALL)) == 130
    assert "interrupted: 2 record(s) kept" in capsys.readouterr().err  # generate and prompt_lookup at T=0
    first = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["temperature"]) for r in first] == [("generate", 0.0), ("prompt_lookup", 0.0)]
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "interrupted"
    assert "## Batch size 1" in (tmp_path / "results.md").read_text()  # the report of what finished

    line = user_error_line(bench_args(tiny_bench_assets, tmp_path, *SMALL), capsys)  # no --resume: refused
    assert "pass --resume" in line
    line = user_error_line(bench_args(tiny_bench_assets, tmp_path, *SMALL, "--resume", "--repeats", "2"), capsys)
    assert "measured with other settings (repeats: 1 before, 2 now)" in line

    def counted(self, method, inputs, temperature, max_new_tokens, seed, **kwargs):
        calls.append((method.label, temperature))
        return original(self, method, inputs, temperature, max_new_tokens, seed, **kwargs)

    monkeypatch.setattr(runner._Caller, "call", counted)
    assert main(bench_args(tiny_bench_assets, tmp_path, *SMALL, "--resume")) == 0
    assert {temperature for _, temperature in calls} == {1.0}  # T=0 is not measured again
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["temperature"]) for r in records] == [
        ("generate", 0.0), ("prompt_lookup", 0.0), ("generate", 1.0), ("prompt_lookup", 1.0)]
    assert records[:2] == first  # kept as they were
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_records"] == 2

    calls.clear()  # everything is there now: a further --resume measures (and loads) nothing
    monkeypatch.setattr(bench_cli, "_measure", lambda *args: pytest.fail("nothing should be measured"))
    assert main(bench_args(tiny_bench_assets, tmp_path, *SMALL, "--resume")) == 0
    assert calls == [] and json.loads((tmp_path / "results.json").read_text()) == records


def test_run_benchmark_skips_done_records_and_reports_each_group(tiny_bench_assets):
    """The library form of --resume: `done` keys are skipped, `on_records` gets each group as it finishes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from specvlm_hf.bench import BenchSettings, build_methods, load_prompts

    target = AutoModelForImageTextToText.from_pretrained(tiny_bench_assets["target"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_bench_assets["target"])
    prompts = load_prompts(tiny_bench_assets["prompts"], default_max_new_tokens=4)[:1]
    methods = build_methods(["prompt_lookup"])
    settings = BenchSettings(temperatures=[0.0, 1.0], batch_sizes=[1, 2], repeats=1)
    groups = []
    done = {("generate", None, None, 0.0, 1), ("prompt_lookup", None, None, 0.0, 1),
            ("prompt_lookup", None, None, 1.0, 2)}
    records, runs, _ = runner.run_benchmark(target, processor, prompts, methods, settings, progress=False,
                                            done=done, on_records=groups.append)
    assert [[runner.record_key(r) for r in group] for group in groups] == [
        [("generate", None, None, 1.0, 1), ("prompt_lookup", None, None, 1.0, 1)],
        [("generate", None, None, 0.0, 2), ("prompt_lookup", None, None, 0.0, 2)],
        [("generate", None, None, 1.0, 2)],  # generate still runs where it is the baseline of a missing record
    ]
    assert records == [r for group in groups for r in group]
    assert {(r.temperature, r.batch_size) for r in runs} == {(1.0, 1), (0.0, 2), (1.0, 2)}
    assert not any(r.method == "prompt_lookup" and r.temperature == 1.0 and r.batch_size == 2 for r in runs)
