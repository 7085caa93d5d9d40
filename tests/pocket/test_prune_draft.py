"""`specvlm pocket prune-draft-vocab`: the shipped draft's head shrunk to its most frequent ids (trained rows kept), its
provenance and card updated, an existing draft never replaced silently. Runs on the tiny LLaVA stand-in."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.errors import UserValueError
from specvlm_hf.pocket import prune_draft
from specvlm_hf.pocket.train_draft import DRAFT_PROVENANCE_FILE
from specvlm_hf.testing.tiny_models import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor
from specvlm_hf.training import build_draft_vocab

WORDS = "red green blue cat dog sky tree the a is".split()


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A tiny 'trained' draft with a 24-id head in `tmp_path/draft`, its provenance, and a 70-record corpus."""
    torch.manual_seed(0)
    target, processor = build_tiny_target("llava"), build_tiny_processor("llava")
    Image.new("RGB", (24, 24), "red").save(tmp_path / "im.png")
    rows = []
    for index in range(70):
        answer = " ".join(WORDS[: 2 + index % 7])
        rows.append({"id": f"r{index}", "images": [str(tmp_path / "im.png")],
                     "conversations": [{"from": "human", "value": "<image>\nwhat is it ?"},
                                       {"from": "gpt", "value": answer}]})
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    draft = SpecVLMDraftModel.from_target(target)
    build_draft_vocab(draft, target, {i: 1 for i in range(target.config.text_config.vocab_size)}, 24)
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight))  # stands for training
    draft.save_pretrained(tmp_path / "draft")
    provenance = {
        "command": "specvlm pocket train-draft --epochs 1",
        "commands": ["specvlm pocket train-draft --epochs 1"],
        "recipe": {"eval_records": 6, "bench_temperatures": [0.0, 1.0], "bench_max_new_tokens": 8, "epochs": 1.0},
        "data": {"train_records": 64, "eval_records": 6},
        "acceptance_setup": "the 11 committed benchmark prompts, fp32 target, greedy",
        "evaluations": [{"epoch": 1.0, "eval_mean_accept_len": 2.5}],
        "draft_vocab_size": 24,
    }
    (tmp_path / "draft" / DRAFT_PROVENANCE_FILE).write_text(json.dumps(provenance))
    monkeypatch.setattr("specvlm_hf.pocket.build.load_pocket_vlm", lambda dtype=None: (target, processor))
    monkeypatch.setattr(prune_draft, "corpus_training_file", lambda work_dir, corpus_dir=None: corpus)
    calls = []

    def fake_acceptance(target, processor, draft, *, temperature, max_new_tokens):
        calls.append((int(draft.config.draft_vocab_size), temperature, max_new_tokens))
        return {"temperature": temperature, "mean_accept_len": 2.0 + draft.config.draft_vocab_size / 100}

    monkeypatch.setattr(prune_draft, "bench_acceptance", fake_acceptance)
    return target, processor, draft, tmp_path, calls


def test_pruned_draft_keeps_trained_rows_and_records_the_pruning(trained):
    target, _, draft, tmp_path, calls = trained
    out = prune_draft.prune_pocket_draft(8, tmp_path / "draft", tmp_path / "pruned", command="specvlm pocket x")
    assert calls == [(24, 0.0, 8), (24, 1.0, 8), (8, 0.0, 8), (8, 1.0, 8)]  # before, then after
    pruned = SpecVLMDraftModel.from_pretrained(out)
    assert pruned.config.draft_vocab_size == 8 and pruned.d2t.numel() == 8
    assert set(pruned.d2t.tolist()) <= set(draft.d2t.tolist())
    rows = [draft.d2t.tolist().index(i) for i in pruned.d2t.tolist()]
    torch.testing.assert_close(pruned.lm_head.weight.float(), draft.lm_head.weight[rows].bfloat16().float())
    # the eos id stays; the rest are the most frequent answer tokens
    assert target.generation_config.eos_token_id in pruned.d2t.tolist()
    provenance = json.loads((out / DRAFT_PROVENANCE_FILE).read_text())
    record = provenance["vocabulary_pruning"]
    assert (record["from_size"], record["size"], provenance["draft_vocab_size"]) == (24, 8, 8)
    assert 0 < record["coverage_after"] <= record["coverage_before"] <= 1
    assert record["acceptance_before"]["T0"]["mean_accept_len"] == 2.24
    assert record["acceptance_after"]["T1"]["mean_accept_len"] == 2.08
    assert provenance["commands"] == ["specvlm pocket train-draft --epochs 1", "specvlm pocket x"]
    card = (out / "README.md").read_text()
    assert "after the head was pruned from 24 to 8 ids" in card and "Mean acceptance length: 2.08" in card
    assert not list(tmp_path.glob("*.prune-tmp"))  # the staging folder is gone


def test_existing_draft_is_refused_before_anything_loads(trained, monkeypatch):
    _, _, _, tmp_path, calls = trained

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("specvlm_hf.pocket.build.load_pocket_vlm", refuse)
    before = (tmp_path / "draft" / "model.safetensors").read_bytes()
    with pytest.raises(UserValueError, match="already holds a draft: pass --overwrite-output"):
        prune_draft.prune_pocket_draft(8, tmp_path / "draft")  # in place, without the flag
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == before and not calls


def test_in_place_with_overwrite_and_bad_sizes(trained):
    _, _, _, tmp_path, calls = trained
    with pytest.raises(UserValueError, match=r"must be in \[1, 23\]"):
        prune_draft.prune_pocket_draft(24, tmp_path / "draft", overwrite_output=True, measure=False)
    prune_draft.prune_pocket_draft(12, tmp_path / "draft", overwrite_output=True, measure=False)
    assert not calls  # --no-measure
    provenance = json.loads((tmp_path / "draft" / DRAFT_PROVENANCE_FILE).read_text())
    assert provenance["vocabulary_pruning"]["acceptance_after"] is None
    assert SpecVLMDraftModel.from_pretrained(tmp_path / "draft").config.draft_vocab_size == 12


def test_cli_flags_reach_the_function(monkeypatch, tmp_path):
    from specvlm_hf.pocket import cli as pocket_cli

    seen = {}
    monkeypatch.setattr(pocket_cli, "require_command_extras", lambda command: None)
    monkeypatch.setattr(prune_draft, "prune_pocket_draft", lambda *args, **kwargs: seen.update(args=args, **kwargs))
    assert pocket_cli.main(["prune-draft-vocab", "--draft-vocab-size", "4096", "--output-dir", str(tmp_path),
                            "--overwrite-output", "--no-measure"]) == 0
    assert seen["args"] == (4096, None, tmp_path) and seen["overwrite_output"] and not seen["measure"]
    assert seen["command"].startswith("specvlm pocket prune-draft-vocab --draft-vocab-size 4096")
