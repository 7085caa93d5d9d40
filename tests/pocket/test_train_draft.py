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
from specvlm_hf.errors import UserValueError
from specvlm_hf.pocket.corpus import self_distill_corpus
from specvlm_hf.pocket.draft import load_pocket_draft
from specvlm_hf.pocket.train_draft import (
    EPOCH_SECONDS_FILE,
    _EpochTimer,
    _record_command,
    epoch_acceptance,
    plot_acceptance_curve,
    split_records,
)
from specvlm_hf.testing.tiny_models import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_target("llava"), build_tiny_processor("llava")


def _records(tmp_path, max_new_tokens=6):
    for index, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"im{index}.png")
    records = [
        {"id": "a", "images": ["im0.png"], "conversations": [{"from": "human", "value": "<image>\ndescribe the image"}]},
        {"id": "b", "images": [], "conversations": [{"from": "human", "value": "what is the color of the sky ?"}]},
        {"id": "c", "images": ["im1.png", "im2.png"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nwhat is in the picture ?"}]},
        {"id": "d", "images": ["im2.png"], "conversations": [{"from": "human", "value": "<image>\nwhat color ?"}]},
        {"id": "e", "images": [], "conversations": [{"from": "human", "value": "what is a cat ?"}]},
    ]
    for record in records:
        record["max_new_tokens"] = max_new_tokens if record["id"] != "e" else max_new_tokens + 3
    return records


def _distill(target, processor, records, out, batch_size=4, chunk_size=1024):
    return self_distill_corpus(
        target, processor, records, out, batch_size=batch_size, chunk_size=chunk_size, show_progress=False
    )


def test_self_distill_corpus_matches_one_by_one_and_resumes(tiny, tmp_path):
    target, processor = tiny
    records = _records(tmp_path)
    out = tmp_path / "train.jsonl"
    with pytest.raises(UserValueError, match="another input"):  # a prefix is another input: never mixed in
        _distill(target, processor, records[:2], out)
        _distill(target, processor, records, out)
    out.unlink()
    stats = _distill(target, processor, records, out, chunk_size=2)
    assert stats["written"] + stats["empty"] == 5 and stats["already_done"] == 0
    assert stats["records_per_second"] > 0 and stats["answer_tokens"] > 0
    again = _distill(target, processor, records, out, chunk_size=2)  # resumes: nothing left to answer
    assert again["written"] == 0 and again["already_done"] == stats["written"]
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sum(row["answer_tokens"] for row in rows.values()) == stats["answer_tokens"]
    single = tmp_path / "single"
    single.mkdir()
    for record in records:  # batch size 1: no padding at all
        for index in range(3):
            (single / f"im{index}.png").write_bytes((tmp_path / f"im{index}.png").read_bytes())
        _distill(target, processor, [record], single / f"{record['id']}.jsonl", batch_size=1)
    for key, row in rows.items():
        (one,) = map(json.loads, (single / f"{key}.jsonl").read_text().splitlines())
        assert row["conversations"][-1]["from"] == "gpt"
        assert row["conversations"] == one["conversations"]
        assert row["answer_tokens"] == one["answer_tokens"] <= row["max_new_tokens"]
    train, held_out = split_records(out, 1)
    assert len(train) == len(rows) - 1 and len(held_out) == 1
    assert all(str(tmp_path) in str(path) for record in train for path in record["images"])
    with pytest.raises(ValueError, match="need more than"):
        split_records(out, len(rows))


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


def test_train_draft_flags_reach_the_recipe(monkeypatch):
    """Every recipe knob set on the command line lands in the `PocketDraftRecipe` that is trained (and saved)."""
    from specvlm_hf.pocket import cli as pocket_cli

    seen = {}
    monkeypatch.setattr(pocket_cli, "require_command_extras", lambda command: None)
    monkeypatch.setattr(
        "specvlm_hf.pocket.train_draft.train_pocket_draft",
        lambda recipe, *args, **kwargs: seen.update(recipe=recipe, **kwargs) or "done",
    )
    flags = [
        "train-draft", "--epochs", "1.5", "--learning-rate", "3e-4", "--batch-size", "4", "--draft-vocab-size", "4096",
        "--train-records", "100", "--ttt-steps", "2", "--ttt-decay", "0.7", "--lambda-logit", "1", "--lambda-feat",
        "0.5", "--target-layer-ids", "2", "15", "-1", "--teacher-dtype", "float32", "--evaluations-per-epoch", "1",
        "--seed", "9", "--no-untrained-eval", "--overwrite-output",
    ]  # fmt: skip
    assert pocket_cli.main(flags) == 0
    assert seen["measure_untrained"] is False and seen["overwrite_output"] is True
    recipe = seen["recipe"]
    assert (recipe.epochs, recipe.learning_rate, recipe.batch_size, recipe.draft_vocab_size) == (1.5, 3e-4, 4, 4096)
    assert (recipe.train_records, recipe.ttt_steps, recipe.ttt_decay) == (100, 2, 0.7)
    assert (recipe.lambda_logit, recipe.lambda_feat, recipe.target_layer_ids) == (1.0, 0.5, [2, 15, -1])
    assert (recipe.teacher_dtype, recipe.evaluations_per_epoch, recipe.seed) == ("float32", 1, 9)


def test_commands_of_a_resumed_run_are_kept_in_order(tmp_path):
    assert _record_command(tmp_path, "specvlm pocket train-draft --epochs 1", resume=False) == [
        "specvlm pocket train-draft --epochs 1"
    ]
    assert _record_command(tmp_path, "specvlm pocket train-draft --epochs 2 --resume", resume=True) == [
        "specvlm pocket train-draft --epochs 1", "specvlm pocket train-draft --epochs 2 --resume",
    ]
    # a fresh run in the same folder starts the history over
    assert _record_command(tmp_path, "specvlm pocket train-draft", resume=False) == ["specvlm pocket train-draft"]


def test_epoch_seconds_survive_a_resume(tmp_path):
    path = tmp_path / EPOCH_SECONDS_FILE
    first = _EpochTimer(path)
    first.on_epoch_begin(None, None, None)
    first.on_epoch_end(None, None, None)
    resumed = _EpochTimer(path, resume=True)
    assert resumed.seconds == first.seconds and len(first.seconds) == 1
    resumed.on_epoch_begin(None, None, None)
    resumed.on_epoch_end(None, None, None)
    assert len(json.loads(path.read_text())) == 2
    assert _EpochTimer(path).seconds == [] and not path.exists()  # a fresh run starts over


def test_a_trained_draft_in_the_output_dir_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from specvlm_hf.pocket import train_draft

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("specvlm_hf.pocket.build.load_pocket_vlm", refuse)
    out = tmp_path / "draft"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"trained")
    with pytest.raises(UserValueError, match="already holds a trained draft: pass --overwrite-output"):
        train_draft.train_pocket_draft(work_dir=tmp_path / "work", output_dir=out)
    assert (out / "model.safetensors").read_bytes() == b"trained"
    assert not (tmp_path / "work" / train_draft.COMMANDS_FILE).exists()  # refused before the run was recorded
