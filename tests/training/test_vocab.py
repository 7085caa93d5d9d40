"""Reduced (EAGLE-3) draft vocabularies built from the training targets' token frequencies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from specvlm_hf.training import (DistillationDataset, OnlineDistillationTrainer, build_draft_vocab, prune_draft_vocab,
                                 token_frequencies)
from specvlm_hf.testing import make_inputs

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


def test_pruning_keeps_the_trained_head_rows(draft, target, tmp_path):
    build_draft_vocab(draft, target, {i: 100 - i for i in range(3, 40)}, 12)  # ids 2 (eos), 3..13
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight))  # stands for training
    before_ids, before_head = draft.d2t.clone(), draft.lm_head.weight.detach().clone()
    hidden = torch.randn(3, draft.config.hidden_size)
    logits_before = draft.compute_logits(hidden)
    ids = prune_draft_vocab(draft, target, {13: 50, 11: 40, 5: 40, 60: 1000}, 4)  # 60 is not in the vocabulary
    assert ids.tolist() == [2, 5, 11, 13] and draft.d2t.tolist() == ids.tolist()  # eos kept, ties by id
    assert draft.config.draft_vocab_size == 4 and draft.lm_head.weight.shape == (4, draft.config.hidden_size)
    rows = [before_ids.tolist().index(i) for i in ids.tolist()]
    torch.testing.assert_close(draft.lm_head.weight, before_head[rows])  # the trained rows, not the target's
    torch.testing.assert_close(draft.compute_logits(hidden), logits_before[:, rows])
    draft.save_pretrained(tmp_path / "pruned")
    loaded = AutoModel.from_pretrained(tmp_path / "pruned")
    assert torch.equal(loaded.d2t, ids) and torch.equal(loaded.lm_head.weight, draft.lm_head.weight)
    inputs = make_inputs("llava", target, with_image=True)
    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft), plain)


def test_pruning_refuses_what_it_cannot_do(draft, target):
    with pytest.raises(ValueError, match="own reduced head"):
        prune_draft_vocab(draft, target, {3: 1}, 4)  # the draft scores the full vocabulary with the target's head
    build_draft_vocab(draft, target, {3: 5, 4: 4}, 6)
    with pytest.raises(ValueError, match="size"):
        prune_draft_vocab(draft, target, {3: 1}, 7)
    with pytest.raises(ValueError, match="not in the draft's vocabulary"):
        prune_draft_vocab(draft, target, {3: 1}, 4, always_include=[50])
    with pytest.raises(ValueError, match="must be in the draft vocabulary"):
        draft.shrink_draft_vocab(torch.tensor([3, 50]))
    ids = prune_draft_vocab(draft, None, {3: 5, 4: 4}, 2)  # no target: nothing forced
    assert ids.tolist() == [3, 4]
    # the target's eos (2) is no longer in the vocabulary: the default keeps what it can, no error
    assert prune_draft_vocab(draft, target, {3: 5, 4: 4}, 1).tolist() == [3]
