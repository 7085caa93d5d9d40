"""OnlineDistillationTrainer: pairing contract, frozen teacher, exact gradient accumulation, saving and evaluation."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, TrainingArguments

import specvlm_hf
from specvlm_hf.testing import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs, reserved_token_ids
from specvlm_hf.training import (
    DistillationDataset,
    OnlineDistillationConfig,
    OnlineDistillationTrainer,
)
from specvlm_hf.training.losses import smooth_l1_feature_loss, soft_cross_entropy

from .training_helpers import make_records, requires_loop, tiny_args, train_batch_vs_accumulation


def draft_files(draft: torch.nn.Module, directory) -> set[str]:
    """What `save_pretrained` writes for the draft alone: config, weights and the `auto_map` code files."""
    draft.save_pretrained(directory)
    files = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "configuration_specvlm_draft.py", "modeling_specvlm_draft.py"} <= files
    return files


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _batch(trainer: OnlineDistillationTrainer, dataset: DistillationDataset) -> dict[str, torch.Tensor]:
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def test_one_step_changes_only_the_draft(target, draft, processor, image_dir, tmp_path):
    teacher_before, draft_before = _snapshot(target), _snapshot(draft)
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=tiny_args(tmp_path),
        train_dataset=make_records(2, image_dir),
        processing_class=processor,
    )
    trainer.train()

    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in draft.parameters()}
    assert not any(module is target for module in draft.modules())
    assert trainer.teacher is target and not target.training
    for name, parameter in target.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), f"teacher tensor {name} changed"
    changed = {name for name, p in draft.named_parameters() if not torch.equal(p.detach(), draft_before[name])}
    assert changed == {name for name, _ in draft.named_parameters()}


def test_logs_every_loss_term_and_metric(target, draft, processor, image_dir, tmp_path):
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=tiny_args(tmp_path, max_steps=2),
        train_dataset=make_records(4, image_dir),
        processing_class=processor,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"loss_logit", "loss_feat", "top1_agreement", "est_accept_len"} <= set(entry)
        assert 0.0 <= entry["top1_agreement"] <= 1.0
        assert 1.0 <= entry["est_accept_len"] <= draft.config.tree_depth + 1
        expected = 0.1 * entry["loss_logit"] + 1.0 * entry["loss_feat"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)


def test_loss_matches_the_pairing_contract_position_by_position(target, draft, processor, image_dir, tmp_path):
    """compute_loss on a padded batch equals a per-row, per-position reference of the contract."""
    dataset = DistillationDataset(make_records(3, image_dir, seed=5), processor, show_progress=False)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset, processing_class=processor
    )
    draft.eval()
    with torch.no_grad():
        batched = trainer.compute_loss(draft, _batch(trainer, dataset))
        total, count = 0.0, 0
        head = target.get_output_embeddings()
        for index in range(len(dataset)):
            example = dataset[index]
            ids, labels = example["input_ids"][None], example["labels"]
            out = target(input_ids=ids, pixel_values=example["pixel_values"], output_hidden_states=True)
            hidden, logits = out.hidden_states, out.logits[0]
            length = ids.shape[1]
            predicted = draft(
                inputs_embeds=hidden[0][:, 1:], target_hidden_states=hidden[-1][:, :-1]
            ).last_hidden_state[0]
            for t in range(length - 2):  # t = L-2 has no x_{t+2}
                if labels[t + 2] == -100:
                    continue
                feature = smooth_l1_feature_loss(predicted[t], hidden[-1][0, t + 1])
                logit = soft_cross_entropy(head(predicted[t]), logits[t + 1])
                total += float(1.0 * feature + 0.1 * logit)
                count += 1
    assert batched.item() == pytest.approx(total / count, rel=1e-5)


def test_a_few_steps_lower_the_loss(target, draft, processor, image_dir, tmp_path):
    records = make_records(4, image_dir, seed=1)
    args = tiny_args(
        tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=12, learning_rate=5e-3
    )
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records, processing_class=processor
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    assert after["eval_loss_feat"] < before["eval_loss_feat"] and after["eval_loss_logit"] < before["eval_loss_logit"]
    assert {"eval_top1_agreement", "eval_est_accept_len"} <= set(after)


def test_gradient_accumulation_is_exact_with_unequal_token_counts(target, processor, image_dir, tmp_path):
    short = make_records(1, image_dir, seed=2, answer_words=(1, 1))
    long = make_records(1, image_dir, seed=3, answer_words=(14, 14))
    dataset = DistillationDataset(short + long, processor, show_progress=False)
    predicted = [int((dataset[i]["labels"][2:] != -100).sum()) for i in range(2)]
    assert predicted[0] * 3 < predicted[1], predicted  # very unequal: a per-micro-batch mean would differ

    torch.manual_seed(7)
    initial = specvlm_hf.SpecVLMDraftModel.from_target(target)
    results = train_batch_vs_accumulation(initial, target, dataset, tmp_path)
    moved = max((results[0][n] - p).abs().max().item() for n, p in initial.named_parameters())
    assert moved > 1e-3
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=2e-6, msg=name)


def test_pixel_values_reach_the_teacher_from_a_datasets_dataset(target, draft, processor, image_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    seen = []
    target.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    rows = datasets.Dataset.from_list(make_records(2, image_dir))
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=rows, processing_class=processor
    )
    trainer.train()
    assert len(seen) == 1
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(seen[0])
    assert seen[0]["pixel_values"].shape == (2, 3, 24, 24)
    assert "labels" not in seen[0] and "shift_labels" not in seen[0]


def test_configuration_guards(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        tiny_args(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="both 0"):
        tiny_args(tmp_path, lambda_logit=0.0, lambda_feat=0.0)
    with pytest.raises(ValueError, match="lambda_logit and lambda_feat must be >= 0"):
        tiny_args(tmp_path, lambda_feat=-1.0)
    with pytest.raises(ValueError, match="feature_noise"):
        tiny_args(tmp_path, feature_noise=-0.1)
    with pytest.raises(ValueError, match="max_length"):
        tiny_args(tmp_path, max_length=2)
    with pytest.raises(ValueError, match="eval_acceptance_max_new_tokens"):
        tiny_args(tmp_path, eval_acceptance_max_new_tokens=0)
    defaults = OnlineDistillationConfig(output_dir=str(tmp_path))
    assert (defaults.lambda_logit, defaults.lambda_feat, defaults.feature_noise) == (0.1, 1.0, 0.0)
    assert defaults.remove_unused_columns is False and defaults.adam_beta2 == 0.95


def test_trainer_rejects_misuse(target, draft, processor, image_dir, tmp_path):
    records = make_records(2, image_dir)
    with pytest.raises(TypeError, match="OnlineDistillationConfig"):
        OnlineDistillationTrainer(model=draft, teacher=target, args=TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="SpecVLM draft"):
        OnlineDistillationTrainer(model=target, teacher=target, args=tiny_args(tmp_path))
    with pytest.raises(ValueError, match="processing_class"):
        OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=records)
    other = build_tiny_target("llava", vocab_size=128)
    with pytest.raises(ValueError, match="vocabulary"):
        OnlineDistillationTrainer(
            model=draft, teacher=other, args=tiny_args(tmp_path), train_dataset=records, processing_class=processor
        )


def test_peft_teacher_merged_or_not(draft, processor, image_dir, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_teacher = peft.get_peft_model(build_tiny_target("llava"), lora)
    merged_teacher = copy.deepcopy(lora_teacher).merge_and_unload()
    plain_teacher = build_tiny_target("llava")
    dataset = DistillationDataset(make_records(2, image_dir), processor, show_progress=False)

    losses = {}
    for name, teacher in (("lora", lora_teacher), ("merged", merged_teacher), ("plain", plain_teacher)):
        trainer = OnlineDistillationTrainer(
            model=draft, teacher=teacher, args=tiny_args(tmp_path), train_dataset=dataset
        )
        draft.eval()
        with torch.no_grad():
            losses[name] = trainer.compute_loss(draft, _batch(trainer, dataset)).item()
    assert losses["lora"] == pytest.approx(losses["merged"], rel=1e-5)
    assert abs(losses["lora"] - losses["plain"]) > 1e-4  # the adapter really changes the teacher

    adapter_before = {n: p.detach().clone() for n, p in lora_teacher.named_parameters() if "lora_" in n}
    assert adapter_before
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=lora_teacher, args=tiny_args(tmp_path), train_dataset=dataset
    )
    trainer.train()
    for name, parameter in lora_teacher.named_parameters():
        assert parameter.grad is None and not parameter.requires_grad
        if name in adapter_before:
            assert torch.equal(parameter, adapter_before[name])


def test_save_load_round_trip(target, draft, processor, image_dir, tmp_path):
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=tiny_args(tmp_path),
        train_dataset=make_records(2, image_dir),
        processing_class=processor,
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    # the draft only (no teacher, no target processor), its model card and the training arguments
    assert set(os.listdir(out)) == draft_files(draft, tmp_path / "plain") | {"README.md", "training_args.bin"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "specvlm_draft" and config["auto_map"]["AutoModel"].endswith("SpecVLMDraftModel")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(draft.state_dict())
    loaded = AutoModel.from_pretrained(out)
    assert type(loaded) is specvlm_hf.SpecVLMDraftModel
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@requires_loop
def test_saved_draft_generates_like_the_target(target, draft, processor, image_dir, tmp_path):
    dataset = DistillationDataset(make_records(2, image_dir), processor, show_progress=False)
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    prompt = dataset.prompt(0)
    plain = target.generate(**prompt, max_new_tokens=10, do_sample=False)
    out = target.generate(
        **prompt, assistant_model=loaded, max_new_tokens=10, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, plain)
    assert out.speculation.mean_accept_len >= 1.0


@requires_loop
def test_evaluate_measures_the_real_acceptance_length(target, draft, processor, image_dir, tmp_path):
    records = make_records(3, image_dir, seed=4)
    args = tiny_args(tmp_path, eval_acceptance_prompts=2, eval_acceptance_max_new_tokens=8)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records, processing_class=processor
    )
    metrics = trainer.evaluate()
    assert 1.0 <= metrics["eval_mean_accept_len"] <= draft.config.tree_depth + 1
    assert metrics["eval_mean_accepted_draft_tokens"] == pytest.approx(metrics["eval_mean_accept_len"] - 1.0)
    assert metrics["eval_acceptance_prompts"] == 2 and metrics["eval_acceptance_max_new_tokens"] == 8
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**Mean acceptance length: {metrics['eval_mean_accept_len']:.2f} tokens per target forward**" in card
    assert "greedy, 2 held-out prompts, max_new_tokens=8" in card


def test_group_by_length_uses_the_measured_lengths(target, draft, processor, image_dir, tmp_path):
    args = tiny_args(tmp_path, train_sampling_strategy="group_by_length", gradient_checkpointing=True, max_steps=2)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=make_records(4, image_dir), processing_class=processor
    )
    sampler = trainer._get_train_sampler()
    assert sampler.lengths == trainer.train_dataset.lengths
    trainer.train()  # also with gradient checkpointing on the draft
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_target_family_gives_a_finite_loss_and_draft_gradients(family, tmp_path):
    """Processor-shaped inputs of every family (mRoPE, sliding windows, tiled images, text-only) train the draft."""
    target = build_tiny_target(family)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    batch = make_inputs(family, target, with_image=family in MULTIMODAL_FAMILIES, prompt_len=9)
    image_id = reserved_token_ids()["image"]
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, -100)
    labels[:, : labels.shape[1] // 2] = -100  # the first half plays the prompt
    batch["labels"] = labels
    batch["shift_labels"] = torch.cat([labels[:, 2:], torch.full_like(labels[:, :2], -100)], dim=1)
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path))
    loss = trainer.compute_loss(draft, batch, num_items_in_batch=int((batch["shift_labels"] != -100).sum()))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in draft.parameters())
    assert not any(p.grad is not None for p in target.parameters())


@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "worker"])
def test_an_image_that_vanishes_after_validation_is_skipped_and_training_continues(
    target, draft, processor, tmp_path, workers
):
    from PIL import Image

    from .training_helpers import COLORS

    rows = []
    for index, color in enumerate(("red", "green", "blue", "red")):
        Image.new("RGB", (24, 24), COLORS[color]).save(tmp_path / f"{index}.png")
        rows.append(
            {
                "images": [f"{index}.png"],
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color ?"},
                    {"from": "gpt", "value": f"the image is {color} ."},
                ],
            }
        )
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = DistillationDataset(path, processor, show_progress=False)
    (tmp_path / "0.png").unlink()  # gone between validation and step 0
    args = tiny_args(tmp_path, max_steps=2, dataloader_num_workers=workers, save_strategy="no")
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=args, train_dataset=dataset)
    output = trainer.train()
    assert trainer.state.global_step == 2
    assert dict(dataset.failed_in_use) == {"missing_image": 1}
    assert f"{path}:1: no image file at" in dataset.skip_examples["missing_image"]
    assert output.metrics["train_records_failed_after_validation"] == 1
    assert "1 failed after validation (missing_image: 1)" in dataset.skip_summary()


@requires_loop
def test_acceptance_prompts_whose_image_vanished_are_skipped_and_counted(target, draft, processor, tmp_path):
    from PIL import Image

    rows = []
    for index in range(2):
        Image.new("RGB", (24, 24), (200, 30 * index, 30)).save(tmp_path / f"{index}.png")
        rows.append(
            {
                "images": [str(tmp_path / f"{index}.png")],
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color ?"},
                    {"from": "gpt", "value": "red ."},
                ],
            }
        )
    dataset = DistillationDataset(rows, processor, show_progress=False)
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset)
    (tmp_path / "0.png").unlink()
    metrics = trainer.measure_acceptance(dataset, num_prompts=2, max_new_tokens=2)
    assert metrics["acceptance_prompts"] == 1.0 and "mean_accept_len" in metrics
    assert dict(dataset.failed_in_use) == {"missing_image": 1} and "record 0" in dataset.skip_examples["missing_image"]
