"""A draft is checked before use: non-finite weights (on load and before generation) and a target of another family."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import AutoModel

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.errors import UserValueError
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs


@pytest.fixture(scope="module")
def llava():
    return build_tiny_target("llava")


@pytest.fixture(scope="module")
def qwen2_vl():
    return build_tiny_target("qwen2_vl")


def _corrupt(draft: SpecVLMDraftModel) -> SpecVLMDraftModel:
    """12 NaN in `fc.weight` and one Inf in `fc.bias`; every other tensor stays finite."""
    with torch.no_grad():
        draft.fc.weight[0, :12] = float("nan")
        draft.fc.bias[3] = float("-inf")
    return draft


def _saved(tmp_path, draft) -> str:
    path = tmp_path / "draft"
    draft.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# non-finite weights
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loader", [SpecVLMDraftModel.from_pretrained, AutoModel.from_pretrained], ids=["SpecVLMDraftModel", "AutoModel"]
)
def test_loading_a_checkpoint_with_non_finite_weights_raises_naming_the_tensors(tmp_path, llava, loader):
    path = _saved(tmp_path, _corrupt(SpecVLMDraftModel.from_target(llava)))
    with pytest.raises(UserValueError) as caught:
        loader(path)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert f"draft checkpoint {path} has non-finite values in 2 tensors: " in message
    assert "fc.weight (12 NaN)" in message and "fc.bias (1 Inf)" in message
    assert "retrain or load an earlier checkpoint" in message


def test_load_error_names_the_first_tensors_and_counts_the_rest(tmp_path, llava):
    draft = SpecVLMDraftModel.from_target(llava)
    names = [name for name, _ in draft.named_parameters()]
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.view(-1)[0] = float("nan")
    path = _saved(tmp_path, draft)
    with pytest.raises(UserValueError, match=f"non-finite values in {len(names)} tensors") as caught:
        SpecVLMDraftModel.from_pretrained(path)
    message = str(caught.value)
    assert f"{names[0]} (1 NaN)" in message
    assert f"and {len(names) - 5} more" in message
    assert names[-1] not in message


def test_loading_finite_checkpoints_still_works_with_loading_info(tmp_path, llava):
    draft = SpecVLMDraftModel.from_target(llava)
    path = _saved(tmp_path, draft)
    loaded, info = SpecVLMDraftModel.from_pretrained(path, output_loading_info=True)
    assert isinstance(loaded, SpecVLMDraftModel) and not info["missing_keys"]
    assert loaded.non_finite_parameters() == []
    _corrupt(draft).save_pretrained(path)
    with pytest.raises(UserValueError, match="fc.weight"):
        SpecVLMDraftModel.from_pretrained(path, output_loading_info=True)


def test_check_compatible_rejects_a_draft_corrupted_in_memory(llava):
    draft = SpecVLMDraftModel.from_target(llava)
    draft.check_compatible(llava)
    weight = draft.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[1, 2] = float("inf")
        weight[0, 0] = float("nan")
    assert draft.non_finite_parameters() == [("layers.0.mlp.down_proj.weight", 1, 1)]
    with pytest.raises(UserValueError, match=r"non-finite values in 1 tensor: layers\.0\.mlp\.down_proj\.weight "
                                             r"\(1 NaN, 1 Inf\)"):
        draft.check_compatible(llava)
    inputs = make_inputs("llava", llava, with_image=False)
    with pytest.raises(UserValueError, match="non-finite"):  # generate checks the draft before it runs
        llava.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
    with torch.no_grad():
        weight.copy_(saved)
    draft.check_compatible(llava)  # the repaired tensor is scanned again (its version counter moved)


def test_finite_check_rescans_only_tensors_that_changed(llava, monkeypatch):
    draft = SpecVLMDraftModel.from_target(llava)
    assert draft.non_finite_parameters() == []
    scanned = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda tensor: scanned.append(tensor.shape) or real_isfinite(tensor))
    assert draft.non_finite_parameters() == [] and scanned == []  # nothing changed: nothing scanned
    # an optimizer step writes in place: every stepped tensor is scanned again, and a diverged step is caught
    weight = draft.fc.weight
    weight.grad = torch.full_like(weight, float("nan"))
    torch.optim.SGD([weight], lr=0.1).step()
    assert draft.non_finite_parameters() == [("fc.weight", weight.numel(), 0)] and scanned == [weight.shape]
    # replacing a tensor's storage (`.data = ...`) is caught too
    scanned.clear()
    weight.data = torch.zeros_like(weight)
    assert draft.non_finite_parameters() == [] and scanned == [weight.shape]
    weight.data = torch.full_like(weight, float("inf"))
    assert draft.non_finite_parameters() == [("fc.weight", 0, weight.numel())]


LOAD_CORRUPT_AS_REMOTE_CODE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])  # hides specvlm_hf
    from transformers import AutoModel
    try:
        AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ValueError as error:
        print("REJECTED", type(error).__module__, error)
    else:
        print("LOADED")
    """
)


def test_remote_code_copy_also_rejects_non_finite_weights(tmp_path, llava):
    """Without the library the checkpoint's own copy of the model file raises a plain `ValueError` subclass."""
    path = _saved(tmp_path, _corrupt(SpecVLMDraftModel.from_target(llava)))
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "specvlm_hf.py").write_text("raise ImportError('specvlm_hf hidden for this test')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CORRUPT_AS_REMOTE_CODE, path, str(blocker)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("REJECTED transformers_modules"), result.stdout
    assert "non-finite values in 2 tensors: fc.weight (12 NaN), fc.bias (1 Inf)" in result.stdout


# --------------------------------------------------------------------------------------------------------------------
# target of another family
# --------------------------------------------------------------------------------------------------------------------
def test_draft_of_another_family_warns_naming_both(llava, qwen2_vl):
    draft = SpecVLMDraftModel.from_target(llava)
    with pytest.warns(UserWarning, match="this draft was built for a 'llava' target but is used with a 'qwen2_vl' "
                                         "target"):
        draft.check_compatible(qwen2_vl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: each message once
        draft.check_compatible(qwen2_vl)
        draft.check_compatible(qwen2_vl)
    assert len(caught) == 1
    # the layouts match, so generation still runs (losslessly, only with poor acceptance)
    inputs = make_inputs("qwen2_vl", qwen2_vl, with_image=True)
    reference = qwen2_vl.generate(**inputs, max_new_tokens=8, do_sample=False)
    with pytest.warns(UserWarning, match="built for a 'llava' target"):
        out = qwen2_vl.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=draft)
    assert out.tolist() == reference.tolist()


@pytest.mark.parametrize(
    "built_for,used_with",
    [
        ("llava", "llava"),  # same family, another checkpoint
        ("qwen2_vl", "qwen2_vl"),
        ("llama", "llava"),  # a draft for the language model of the VLM's own text family
        (None, "qwen2_vl"),  # no provenance recorded (hand-built config)
    ],
)
def test_matching_or_unknown_family_emits_no_warning(built_for, used_with):
    target = build_tiny_target(used_with, seed=1)
    if built_for is None:
        draft = SpecVLMDraftModel.from_target(target, target_model_type=None)
    else:
        draft = SpecVLMDraftModel.from_target(build_tiny_target(built_for))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draft.check_compatible(target)


def test_another_family_with_another_layout_raises_naming_both_and_the_differences(llava):
    target = build_tiny_target("qwen2_vl", vocab_size=128)
    draft = SpecVLMDraftModel.from_target(llava)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error says it all: no warning on top
        with pytest.raises(UserValueError, match="does not match the target") as caught:
            draft.check_compatible(target)
    message = str(caught.value)
    assert "'llava'" in message and "'qwen2_vl'" in message
    assert "target vocabulary has 128 tokens, the draft was built for 96" in message
