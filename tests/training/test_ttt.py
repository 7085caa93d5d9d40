"""Training-time test (EAGLE-3): masks, shifts, weights, the drafter-exact reference, exact accumulation, provenance."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel
from transformers.cache_utils import DynamicCache

import specvlm_hf
from specvlm_hf.errors import UserValueError
from specvlm_hf.models import ElasticCompressorConfig
from specvlm_hf.training import DistillationDataset, OnlineDistillationTrainer
from specvlm_hf.training.losses import smooth_l1_feature_loss, soft_cross_entropy
from specvlm_hf.training.ttt import shift_left, ttt_attention_mask, ttt_loss_mask, ttt_step_weights

from .training_helpers import make_records, tiny_args, train_batch_vs_accumulation


# ----------------------------------------------------------------------------------------------------------------
# pure builders
# ----------------------------------------------------------------------------------------------------------------
def test_step_weights_decay_geometrically_and_step_zero_weighs_one():
    assert ttt_step_weights(1, 0.8) == [1.0]
    assert ttt_step_weights(3, 0.8) == pytest.approx([1.0, 0.8, 0.64])
    assert ttt_step_weights(3, 0.5)[0] == 1.0
    with pytest.raises(ValueError):
        ttt_step_weights(0, 0.8)


def test_shifts_move_left_and_fill_the_tail():
    values = torch.arange(10).view(2, 5)
    assert shift_left(values, 0) is values
    assert shift_left(values, 2).tolist() == [[2, 3, 4, 0, 0], [7, 8, 9, 0, 0]]
    assert shift_left(values, 7).tolist() == [[0] * 5, [0] * 5]
    embeds = torch.randn(1, 4, 3)
    shifted = shift_left(embeds, 1)
    assert torch.equal(shifted[:, :3], embeds[:, 1:]) and torch.equal(shifted[:, 3], torch.zeros(1, 3))
    labels = torch.tensor([[False, True, True, False, True]])
    # chain t at step 2 predicts x_{t+4}: counts iff position t + 2 counted at step 0 and t + 2 < n
    assert ttt_loss_mask(labels, 2).tolist() == [[True, False, True, False, False]]
    assert ttt_loss_mask(labels, 0).tolist() == labels.tolist()


def test_mask_for_three_steps_is_causal_context_then_diagonals():
    n = 4
    allowed = lambda mask: (mask == 0)[:, 0]  # noqa: E731
    step1 = ttt_attention_mask(None, 1, batch_size=1, length=n, dtype=torch.float32)
    step2 = ttt_attention_mask(None, 2, batch_size=1, length=n, dtype=torch.float32)
    assert step1.shape == (1, 1, n, 2 * n) and step2.shape == (1, 1, n, 3 * n)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    eye = torch.eye(n, dtype=torch.bool)
    assert torch.equal(allowed(step1)[0], torch.cat([causal, eye], dim=1))
    assert torch.equal(allowed(step2)[0], torch.cat([causal, eye, eye], dim=1))
    assert set(step2.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    # padding: keys at padded positions are hidden from the context block; every row still sees itself
    padding = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    padded = allowed(ttt_attention_mask(padding, 2, batch_size=2, length=n, dtype=torch.bfloat16))
    assert padded.shape == (2, n, 3 * n)
    assert not padded[0, :, 3].any() and not padded[1, :, 0].any()
    assert torch.equal(padded[1, :, :n], causal & padding[1].bool()[None])
    assert padded.any(-1).all()
    assert torch.equal(padded[:, :, 2 * n :], eye.expand(2, -1, -1))
    with pytest.raises(ValueError):
        ttt_attention_mask(None, 0, batch_size=1, length=n, dtype=torch.float32)


def test_configuration_guards(tmp_path):
    args = tiny_args(tmp_path)
    assert (args.ttt_steps, args.ttt_decay) == (1, 0.8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserValueError, match="ttt_steps"):
            tiny_args(tmp_path, ttt_steps=bad)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(UserValueError, match="ttt_decay"):
            tiny_args(tmp_path, ttt_decay=bad)
    with pytest.raises(UserValueError, match="max_length"):
        tiny_args(tmp_path, ttt_steps=4, max_length=5)
    assert tiny_args(tmp_path, ttt_steps=7, ttt_decay=1.0).ttt_steps == 7


# ----------------------------------------------------------------------------------------------------------------
# the loss against a reference that runs the draft the way the tree drafter does
# ----------------------------------------------------------------------------------------------------------------
def _reference_loss(draft, target, dataset, ttt_steps: int, decay: float) -> float:
    """
    Per row and per chain root `t`: a catch-up over the context `0 .. t` into a fresh cache (as the drafter's
    prefill), then one single-token call per step at position `t + i`, fed the previous step's output (as the
    drafter's tree steps). Sums `decay**i * (0.1 * CE + SmoothL1)` over labelled targets, divided by the labelled
    step-0 tokens.
    """
    head = target.get_output_embeddings()
    total, count = 0.0, 0
    for index in range(len(dataset)):
        example = dataset[index]
        ids, labels = example["input_ids"][None], example["labels"]
        out = target(input_ids=ids, pixel_values=example["pixel_values"], output_hidden_states=True)
        hidden, logits = out.hidden_states, out.logits[0]
        embeds, features = hidden[0][:, 1:], draft.select_features(hidden)[:, :-1]
        n = ids.shape[1] - 1
        count += int((labels[2:] != -100).sum())
        for t in range(n):
            cache = DynamicCache()
            h = draft(
                inputs_embeds=embeds[:, : t + 1],
                target_hidden_states=features[:, : t + 1],
                position_ids=torch.arange(t + 1)[None],
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1:]
            for step in range(ttt_steps):
                if step > 0:
                    if t + step >= n:
                        break
                    h = draft(
                        inputs_embeds=embeds[:, t + step : t + step + 1],
                        target_hidden_states=h,
                        position_ids=torch.tensor([[t + step]]),
                        past_key_values=cache,
                        use_cache=True,
                    ).last_hidden_state
                if t + step + 2 >= len(labels) or labels[t + step + 2] == -100:
                    continue
                predicted = h[0, 0]
                draft_logits = draft.compute_logits(predicted, head)
                teacher = logits[t + step + 1]
                if draft.d2t is not None:
                    teacher = teacher[draft.d2t]
                feature = smooth_l1_feature_loss(predicted, hidden[-1][0, t + step + 1])
                logit = soft_cross_entropy(draft_logits, teacher)
                total += decay**step * float(1.0 * feature + 0.1 * logit)
    return total / count


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param({}, id="last-layer-full-head"),
        pytest.param({"target_layer_ids": [1, 2, -1], "draft_vocab_size": 40}, id="multi-layer-reduced-head"),
    ],
)
def test_loss_equals_the_drafter_run_chain_by_chain(shape, target, processor, image_dir, tmp_path):
    torch.manual_seed(3)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, **shape)
    dataset = DistillationDataset(make_records(3, image_dir, seed=5), processor, show_progress=False)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path, ttt_steps=3), train_dataset=dataset
    )
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    assert batch["attention_mask"].min() == 0  # padded rows are part of the check
    draft.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(draft, batch)
        reference = _reference_loss(draft, target, dataset, ttt_steps=3, decay=0.8)
        reference_one = _reference_loss(draft, target, dataset, ttt_steps=1, decay=0.8)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    assert reference > 1.3 * reference_one  # the later steps really add to the loss
    metrics = trainer._flush_metrics("eval")
    assert {"ttt1_loss_logit", "ttt1_loss_feat", "ttt1_top1_agreement", "ttt2_top1_agreement"} <= set(metrics)


@pytest.mark.parametrize("layers", [None, [1, 2, -1]], ids=["last-layer", "multi-layer"])
def test_a_bf16_teacher_trains_an_fp32_draft(layers, target, processor, image_dir, tmp_path):
    """The pocket recipe's setting (bf16 teacher on a CPU with bf16 units, fp32 master weights), fused layers included."""
    teacher = copy.deepcopy(target).to(torch.bfloat16)
    torch.manual_seed(3)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, target_layer_ids=layers, draft_vocab_size=40).float()
    dataset = DistillationDataset(make_records(2, image_dir, seed=5), processor, show_progress=False)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=teacher, args=tiny_args(tmp_path, ttt_steps=2), train_dataset=dataset
    )
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    loss = trainer.compute_loss(draft, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in draft.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert draft.fc.weight.grad.abs().sum() > 0
    if layers is not None:
        assert draft.feature_proj.weight.grad.abs().sum() > 0


def test_one_step_is_exactly_the_eagle1_loss(target, draft, processor, image_dir, tmp_path):
    """ttt_steps=1 is the plain loss bit for bit; the step-0 terms of ttt_steps=3 are the same numbers."""
    dataset = DistillationDataset(make_records(3, image_dir, seed=5), processor, show_progress=False)
    results = {}
    for steps in (1, 3):
        trainer = OnlineDistillationTrainer(
            model=draft, teacher=target, args=tiny_args(tmp_path, ttt_steps=steps), train_dataset=dataset
        )
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        draft.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(draft, batch)
        sums = dict(trainer._metric_sums["eval"])
        trainer._metric_sums["eval"].clear()
        results[steps] = (loss, sums)
    loss_one, sums_one = results[1]
    expected = (0.1 * sums_one["loss_logit"].float() + 1.0 * sums_one["loss_feat"].float()) / sums_one["tokens"].float()
    assert torch.equal(loss_one, expected)
    assert not any(key.startswith("ttt") for key in sums_one)
    loss_three, sums_three = results[3]
    for key in ("tokens", "loss_logit", "loss_feat", "top1_agreement"):
        assert torch.equal(sums_three[key], sums_one[key]), key
    later = sum(
        0.8**step * (0.1 * sums_three[f"ttt{step}_loss_logit"] + sums_three[f"ttt{step}_loss_feat"]) for step in (1, 2)
    )
    assert loss_three.item() == pytest.approx(loss_one.item() + later.item() / sums_one["tokens"].item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
def test_gradient_accumulation_is_exact_with_three_steps(target, processor, image_dir, tmp_path):
    short = make_records(1, image_dir, seed=2, answer_words=(1, 1))
    long = make_records(1, image_dir, seed=3, answer_words=(14, 14))
    dataset = DistillationDataset(short + long, processor, show_progress=False)
    torch.manual_seed(7)
    initial = specvlm_hf.SpecVLMDraftModel.from_target(target, target_layer_ids=[1, -1], draft_vocab_size=40)
    results = train_batch_vs_accumulation(initial, target, dataset, tmp_path, ttt_steps=3)
    moved = max((results[0][n] - p).abs().max().item() for n, p in initial.named_parameters())
    assert moved > 1e-3
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=2e-6, msg=name)


def test_a_few_steps_lower_the_loss_with_three_steps(target, draft, processor, image_dir, tmp_path):
    records = make_records(4, image_dir, seed=1)
    args = tiny_args(
        tmp_path,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=12,
        learning_rate=5e-3,
        ttt_steps=3,
    )
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records, processing_class=processor
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    for step in (1, 2):
        assert after[f"eval_ttt{step}_loss_feat"] < before[f"eval_ttt{step}_loss_feat"]
        assert after[f"eval_ttt{step}_loss_logit"] < before[f"eval_ttt{step}_loss_logit"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("ttt2_top1_agreement" in entry for entry in logs)


def test_the_recipe_is_saved_in_the_draft_config(target, processor, image_dir, tmp_path):
    torch.manual_seed(1)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, target_layer_ids=[1, -1])
    assert draft.config.training_recipe is None
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=tiny_args(tmp_path, ttt_steps=3, ttt_decay=0.7),
        train_dataset=make_records(2, image_dir),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModel.from_pretrained(str(tmp_path / "saved"))
    recipe = loaded.config.training_recipe
    assert recipe["ttt_steps"] == 3 and recipe["ttt_decay"] == 0.7
    assert recipe["multi_layer_features"] is True and recipe["target_layer_ids"] == [1, -1]
    assert (recipe["lambda_logit"], recipe["lambda_feat"]) == (0.1, 1.0)
    assert loaded.config.to_dict()["training_recipe"] == draft.config.training_recipe


def test_gradient_checkpointing_refuses_more_than_one_step(target, draft, processor, image_dir, tmp_path):
    with pytest.raises(UserValueError, match="gradient checkpointing"):
        OnlineDistillationTrainer(
            model=draft,
            teacher=target,
            args=tiny_args(tmp_path, ttt_steps=2, gradient_checkpointing=True),
            train_dataset=make_records(2, image_dir),
            processing_class=processor,
        )


def test_a_compressor_refuses_more_than_one_step(target, processor, image_dir, tmp_path):
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, compressor_config=ElasticCompressorConfig(mode="select"))
    with pytest.raises(UserValueError, match="compressor"):
        OnlineDistillationTrainer(
            model=draft,
            teacher=target,
            args=tiny_args(tmp_path, ttt_steps=2),
            train_dataset=make_records(2, image_dir),
            processing_class=processor,
        )
    OnlineDistillationTrainer(  # one step is the plain loss: fine
        model=draft,
        teacher=target,
        args=tiny_args(tmp_path, ttt_steps=1),
        train_dataset=make_records(2, image_dir),
        processing_class=processor,
    )
