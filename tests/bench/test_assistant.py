"""The truncated-layer assistant (`specvlm_hf.bench.assistant`) used by the `assisted` baseline."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf.bench.assistant import (
    build_truncated_assistant,
    choose_assistant_layers,
)
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs


def test_truncated_assistant_shares_the_target_weights():
    target = build_tiny_target("llava")
    assistant = build_truncated_assistant(target, 1)
    language_model = target.model.language_model
    assert assistant.config.num_hidden_layers == 1
    assert assistant.model.layers[0] is language_model.layers[0]
    assert assistant.model.embed_tokens is language_model.embed_tokens
    assert assistant.lm_head is target.get_output_embeddings()
    assert not any(p.is_meta for p in assistant.parameters())
    assert not any(b.is_meta for b in assistant.buffers())


def test_full_depth_assistant_equals_the_text_model():
    target = build_tiny_target("llava")
    assistant = build_truncated_assistant(target, 2)
    ids = make_inputs("llava", target, with_image=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(assistant(input_ids=ids).logits, target(input_ids=ids).logits)


def test_assisted_generation_with_a_llava_target_is_greedy_exact():
    target = build_tiny_target("llava")
    inputs = make_inputs("llava", target, with_image=True)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    assistant = build_truncated_assistant(target, 1)
    out = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert out.tolist() == reference.tolist()


def test_errors():
    target = build_tiny_target("llava")
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 2\]"):
        build_truncated_assistant(target, 3)
    with pytest.raises(ValueError, match="needs a Llama text model"):
        build_truncated_assistant(build_tiny_target("qwen2"), 1)


def test_choose_assistant_layers_trades_agreement_for_cost():
    cost = {2: 0.2, 10: 0.5, 28: 0.95}
    flat = choose_assistant_layers({2: 0.1, 10: 0.1, 28: 0.4}, cost)
    assert flat["layers"] == 2 and flat["draft_tokens"] == 1
    strong = choose_assistant_layers({2: 0.1, 10: 0.9, 28: 0.95}, cost)
    assert strong["layers"] == 10 and strong["modelled_speedup"] > 1
    assert strong["modelled_speedup_per_layers"][10] == strong["modelled_speedup"]


@pytest.mark.parametrize("blind", [True, False])
def test_measure_truncation_agreement_on_a_tiny_llava(blind):
    from specvlm_hf.bench.assistant import measure_truncation_agreement
    from specvlm_hf.testing.tiny_processors import build_tiny_processor

    target = build_tiny_target("llava")
    prompts = [(None, "describe a cat"), ("circle", "what color is the image ?")]
    result = measure_truncation_agreement(target, build_tiny_processor(), layers=[1, 2], max_new_tokens=5,
                                          prompts=prompts, blind=blind)
    assert result["tokens"] > 0 and result["blind"] is blind
    assert set(result["agreement"]) == {1, 2} and all(0 <= p <= 1 for p in result["agreement"].values())
    assert result["relative_cost"][2] == pytest.approx(1.0) and result["relative_cost"][1] < 1
    if not blind:  # the full model teacher-forced on its own greedy output agrees with itself
        assert result["agreement"][2] == pytest.approx(1.0)
    assert result["choice"]["layers"] in (1, 2)


def test_the_bench_does_not_depend_on_the_pocket_package_and_old_imports_still_work():
    import ast
    import pathlib

    import specvlm_hf.bench as bench
    from specvlm_hf.bench import assistant, prompts
    from specvlm_hf.pocket import assistant as pocket_assistant
    from specvlm_hf.pocket import data as pocket_data

    # general bench features (default prompts, the truncated:K assistant) import nothing from specvlm_hf.pocket at
    # module level; only the pocket VLM's own loading in cli.py does, lazily
    for path in pathlib.Path(bench.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not any("pocket" in (getattr(node, "module", None) or "") for node in top_level), path.name
    assert prompts.DEFAULT_PROMPTS_PATH.is_file() and prompts.DEFAULT_PROMPTS_PATH.parent == prompts.BENCH_DIR
    assert (pocket_data.BENCH_DIR, pocket_data.BENCH_PROMPTS_FILE) == (prompts.BENCH_DIR, prompts.BENCH_PROMPTS_FILE)
    for name in ("build_truncated_assistant", "measure_truncation_agreement", "choose_assistant_layers",
                 "calibration_images", "CALIBRATION_PROMPTS"):
        assert getattr(pocket_assistant, name) is getattr(assistant, name)
    assert pocket_assistant.POCKET_ASSISTANT_LAYERS == 2
