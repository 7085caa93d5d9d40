"""Pieces of the pocket draft recipe that run without the real weights: batched self-distillation (resumable, grouped
by image count, identical to one-by-one greedy answers), the per-epoch acceptance rows and their plot, the draft loader
and the demo helpers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.pocket.draft import load_pocket_draft
from specvlm_hf.pocket.train_draft import epoch_acceptance, plot_acceptance_curve, self_distill_batched, split_records
from specvlm_hf.testing.tiny_models import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_target("llava"), build_tiny_processor("llava")


def _records(tmp_path):
    for index, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"im{index}.png")
    return [
        {"id": "a", "images": ["im0.png"], "conversations": [{"from": "human", "value": "<image>\ndescribe the image"}]},
        {"id": "b", "images": [], "conversations": [{"from": "human", "value": "what is the color of the sky ?"}]},
        {"id": "c", "images": ["im1.png", "im2.png"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nwhat is in the picture ?"}]},
        {"id": "d", "images": ["im2.png"], "conversations": [{"from": "human", "value": "<image>\nwhat color ?"}]},
    ]


def test_self_distill_batched_matches_one_by_one_and_resumes(tiny, tmp_path):
    target, processor = tiny
    records = _records(tmp_path)
    out = tmp_path / "train.jsonl"
    written = self_distill_batched(target, processor, records[:2], out, max_new_tokens=6, batch_size=4,
                                   show_progress=False)
    assert written == 2
    written = self_distill_batched(target, processor, records, out, max_new_tokens=6, batch_size=4,
                                   show_progress=False)
    assert written == 2  # a and b were already answered
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["a", "b", "c", "d"]
    single = tmp_path / "single.jsonl"
    for record in records:  # batch size 1: no padding at all
        self_distill_batched(target, processor, [record], single, max_new_tokens=6, batch_size=1, show_progress=False)
    singles = {row["id"]: row for row in map(json.loads, single.read_text().splitlines())}
    for key, row in rows.items():
        assert row["conversations"][-1]["from"] == "gpt"
        assert row["conversations"] == singles[key]["conversations"]
    train, held_out = split_records(out, 1)
    assert len(train) == 3 and len(held_out) == 1
    assert all(str(tmp_path) in str(path) for record in train for path in record["images"])
    with pytest.raises(ValueError, match="need more than"):
        split_records(out, 4)


def test_epoch_rows_and_plot(tmp_path):
    history = [
        {"loss": 3.0, "epoch": 0.5},
        {"eval_mean_accept_len": 1.8, "eval_loss": 2.0, "epoch": 1.0},
        {"eval_mean_accept_len": 2.4, "eval_loss": 1.5, "epoch": 2.0},
        {"train_runtime": 10.0},
    ]
    rows = epoch_acceptance(history)
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    assert [row["eval_mean_accept_len"] for row in rows] == [1.8, 2.4]
    path = plot_acceptance_curve([{"epoch": 0.0, "eval_mean_accept_len": 1.0}] + rows, tmp_path / "a.png", "t")
    with Image.open(path) as image:
        assert image.size[0] > 100


def test_load_pocket_draft_casts_checks_and_explains_a_missing_checkpoint(tiny, tmp_path):
    target, _ = tiny
    with pytest.raises(FileNotFoundError, match="specvlm pocket train-draft"):
        load_pocket_draft(target, tmp_path / "missing")
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path / "draft")
    draft = load_pocket_draft(target.to(torch.bfloat16), tmp_path / "draft")
    assert draft.dtype == torch.bfloat16 and not draft.training
    target.float()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="hidden size"):
        load_pocket_draft(other, tmp_path / "draft")
