"""Reduced (EAGLE-3) draft vocabularies built from the training targets' token frequencies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from specvlm_hf.training import DistillationDataset, OnlineDistillationTrainer, build_draft_vocab, token_frequencies

from .training_helpers import make_records, tiny_args


def test_most_frequent_tokens_eos_forced_ties_by_id(draft, target):
    counts = {5: 10, 7: 10, 3: 1}
    ids = build_draft_vocab(draft, target, counts, 4)  # eos (2) is always kept
    assert ids.tolist() == [2, 3, 5, 7]
    assert draft.d2t.tolist() == [2, 3, 5, 7] and draft.config.draft_vocab_size == 4
    torch.testing.assert_close(draft.lm_head.weight, target.get_output_embeddings().weight[ids])
    # fewer distinct tokens than requested: the smallest unused ids fill the rest
    assert build_draft_vocab(draft, target, counts, 6).tolist() == [0, 1, 2, 3, 5, 7]
    assert build_draft_vocab(draft, target, counts, 3, always_include=[]).tolist() == [3, 5, 7]


def test_frequency_sources_agree(processor, image_dir):
    dataset = DistillationDataset(make_records(4, image_dir, seed=6), processor, show_progress=False)
    from_dataset = token_frequencies(dataset, 96)
    from_examples = token_frequencies((dataset[i] for i in range(len(dataset))), 96)
    from_mapping = token_frequencies(dict(dataset.label_token_counts), 96)
    torch.testing.assert_close(from_dataset, from_examples)
    torch.testing.assert_close(from_dataset, from_mapping)
    torch.testing.assert_close(token_frequencies(from_dataset, 96), from_dataset)
    assert from_dataset.sum() == sum(int((dataset[i]["labels"][2:] != -100).sum()) for i in range(len(dataset)))


def test_invalid_requests_raise(draft, target):
    with pytest.raises(ValueError, match="size"):
        build_draft_vocab(draft, target, {3: 1}, 0)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        build_draft_vocab(draft, target, {500: 1}, 4)
    with pytest.raises(ValueError, match="always_include"):
        build_draft_vocab(draft, target, {3: 1}, 1, always_include=[1, 2])
    with pytest.raises(ValueError, match="shape"):
        token_frequencies(torch.ones(5), 96)


def test_training_and_saving_a_reduced_vocabulary_draft(draft, target, processor, image_dir, tmp_path):
    dataset = DistillationDataset(make_records(4, image_dir, seed=7), processor, show_progress=False)
    ids = build_draft_vocab(draft, target, dataset, 40)
    head_before = draft.lm_head.weight.detach().clone()
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path, max_steps=2), train_dataset=dataset
    )
    trainer.train()
    assert not torch.equal(draft.lm_head.weight, head_before)  # the reduced head trains with the draft
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.draft_vocab_size == 40 and torch.equal(loaded.d2t, ids)
    assert "reduced: 40 of 96 target tokens" in (tmp_path / "saved" / "README.md").read_text()
