"""OnlineDistillationTrainer with a visual compressor: joint training, pairing, token cost, exactness, losslessness."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModel

import specvlm_hf
from specvlm_hf.models import ElasticCompressorConfig
from specvlm_hf.testing import FAMILIES, MULTIMODAL_FAMILIES, build_tiny_target, make_inputs, reserved_token_ids
from specvlm_hf.training import DistillationDataset, OnlineDistillationTrainer
from specvlm_hf.training.losses import gate_entropy, smooth_l1_feature_loss, soft_cross_entropy

from .training_helpers import make_records, requires_loop, tiny_args, train_batch_vs_accumulation

# A tiny LLaVA image is 9 tokens on a 3 x 3 grid: at ratio 3, prune / pool / conv keep 3 tokens (1 x 3 windows), the
# resampler 2, text-only 0.
RATIOS = {"prune_ratio": 3, "pool_ratio": 3, "conv_ratio": 3, "weighted_ratio": 3}
ALL_SELECT = ["pool", "conv", "resampler", "prune", "text_only"]
CASES = {
    "select-all": {"mode": "select", "primitives": ALL_SELECT},
    "select-conv-resampler": {"mode": "select", "primitives": ["conv", "resampler"]},
    "weighted": {"mode": "weighted", "primitives": ["prune", "pool", "conv"]},
    "concat": {"mode": "concat", "primitives": ["pool", "conv", "resampler", "prune"]},
}
LEARNED = ("conv", "resampler")  # primitives with parameters


def compressed_draft(target, *, perturb: bool = False, **fields) -> specvlm_hf.SpecVLMDraftModel:
    """A draft with a compressor at ratio 3; `perturb` moves the compressor off its structured initialisation (a
    zero query projection gives the resampler's queries and keys a zero gradient on the first step)."""
    torch.manual_seed(1)
    config = ElasticCompressorConfig(**{**RATIOS, **fields})
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, compressor_config=config)
    if perturb:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in draft.compressor.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return draft


def text_record(words: str = "tell me a story", answer: str = "red blue green .") -> dict:
    return {"conversations": [{"from": "human", "value": words}, {"from": "gpt", "value": answer}]}


def record_compressor_calls(draft) -> list[dict]:
    """Every compressor call: its mode (training or not), the choices and grids it received."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({"training": module.training, "choice": output.choice.tolist(), "grids": kwargs.get("grid_sizes"),
                      "n_visual_in": output.n_visual_in.tolist(), "n_visual_out": output.n_visual_out.tolist()})

    draft.compressor.register_forward_hook(hook, with_kwargs=True)
    return calls


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _batch(trainer, dataset, indices=None) -> dict[str, torch.Tensor]:
    indices = range(len(dataset)) if indices is None else indices
    return trainer.data_collator([dataset[i] for i in indices])


# --------------------------------------------------------------------------------------------------------------------
# joint training
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_trains_the_compressor_and_the_draft_never_the_teacher(
    case, target, processor, image_dir, tmp_path, caplog
):
    draft = compressed_draft(target, perturb=True, token_cost=0.1, **CASES[case])
    calls = record_compressor_calls(draft)
    teacher_before, draft_before = _snapshot(target), _snapshot(draft)
    with caplog.at_level(logging.WARNING):
        trainer = OnlineDistillationTrainer(
            model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=make_records(2, image_dir),
            processing_class=processor,
        )
    assert "compressor" not in caplog.text  # the old "does not train the compressor" warning is gone
    trainer.train()

    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in draft.parameters()}
    for name, parameter in target.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), f"teacher tensor {name} changed"

    assert len(calls) == 1 and calls[0]["training"]  # one compressed draft call, gate in training mode
    assert calls[0]["n_visual_in"] == [9, 9]
    changed = {name for name, p in draft.named_parameters() if not torch.equal(p.detach(), draft_before[name])}
    names = {name for name, _ in draft.named_parameters()}
    assert {name for name in names if not name.startswith("compressor.")} <= changed  # the whole draft
    config = draft.compressor.config
    if config.uses_gate:
        assert {name for name in names if name.startswith("compressor.gate.")} <= changed
    # select mode trains the primitive each row chose (only it produced tokens); the others train every primitive
    chosen = {config.primitives[i] for i in calls[0]["choice"]} if config.mode == "select" else set(config.primitives)
    for primitive in LEARNED:
        if primitive not in config.primitives:
            continue
        own = {name for name in names if name.startswith(f"compressor.branches.{primitive}.")}
        if primitive in chosen:
            assert own <= changed, (primitive, own - changed)
        else:
            assert not own & changed, primitive


@pytest.mark.parametrize("case", ["select-all", "weighted", "concat"])
def test_a_few_steps_lower_the_loss_and_evaluation_is_deterministic(case, target, processor, image_dir, tmp_path):
    records = make_records(4, image_dir, seed=1)
    args = tiny_args(
        tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=12, learning_rate=5e-3
    )
    draft = compressed_draft(target, token_cost=0.05, **CASES[case])
    calls = record_compressor_calls(draft)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records, processing_class=processor
    )
    before = trainer.evaluate()
    assert trainer.evaluate()["eval_loss"] == before["eval_loss"]  # argmax gate, seeded pruning: reproducible
    assert not any(call["training"] for call in calls)
    trainer.train()
    assert all(call["training"] for call in calls[2:])
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    assert after["eval_loss_feat"] < before["eval_loss_feat"] and after["eval_loss_logit"] < before["eval_loss_logit"]
    assert {"eval_loss_token_cost", "eval_compressor_kept_fraction", "eval_compressor_expected_kept_fraction"} <= set(
        after
    )


def test_logs_the_compressor_terms(target, processor, image_dir, tmp_path):
    draft = compressed_draft(target, token_cost=0.2, **CASES["select-all"])
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path, max_steps=2), train_dataset=make_records(4, image_dir),
        processing_class=processor,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        choices = [entry[f"compressor_choice_{name}"] for name in ALL_SELECT]
        assert sum(choices) == pytest.approx(1.0) and all(0.0 <= value <= 1.0 for value in choices)
        assert 0.0 <= entry["compressor_gate_entropy"] <= math.log(len(ALL_SELECT)) + 1e-6
        assert 0.0 <= entry["compressor_kept_fraction"] <= 1.0
        assert 0.0 < entry["compressor_expected_kept_fraction"] <= 1.0
        # every row has an image: the cost per row is token_cost times the mean expected kept fraction
        assert entry["loss_token_cost"] == pytest.approx(0.2 * entry["compressor_expected_kept_fraction"], rel=1e-5)
        expected = 0.1 * entry["loss_logit"] + 1.0 * entry["loss_feat"] + entry["loss_token_cost"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)
    assert "elastic compressor (`select` mode) trained jointly, + 0.2" in trainer._training_summary()["loss"]


def test_a_draft_without_compressor_logs_nothing_new(target, draft, processor, image_dir, tmp_path):
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=make_records(2, image_dir),
        processing_class=processor,
    )
    trainer.train()
    entry = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert not any("compressor" in key or "token_cost" in key for key in entry)


# --------------------------------------------------------------------------------------------------------------------
# pairing of the compressed outputs with their targets
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["select", "concat"])
def test_an_identity_compressor_reproduces_the_uncompressed_loss(mode, target, processor, image_dir, tmp_path):
    """Pooling at ratio 1 keeps every position in place: the compressed loss must equal the plain one."""
    dataset = DistillationDataset(
        make_records(3, image_dir, seed=5), processor, assistant_only_loss=False, show_progress=False
    )
    draft = compressed_draft(target, mode=mode, primitives=["pool"], pool_ratio=1).eval()
    plain = copy.deepcopy(draft)
    plain.compressor = None
    losses, outputs = [], []
    for model in (draft, plain):
        trainer = OnlineDistillationTrainer(
            model=model, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset
        )
        with torch.no_grad():
            loss, out = trainer.compute_loss(model, _batch(trainer, dataset), return_outputs=True)
        losses.append(loss.item())
        outputs.append(out)
    compressed = outputs[0].compressor_output
    assert compressed is not None and outputs[1].compressor_output is None
    assert torch.equal(compressed.n_visual_out, compressed.n_visual_in)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_loss_pairs_every_kept_position_with_its_targets(target, processor, image_dir, tmp_path):
    """compute_loss on a padded batch equals a per-row reference built from `fuse_and_compress` and `kept_index`."""
    dataset = DistillationDataset(
        make_records(3, image_dir, seed=5), processor, assistant_only_loss=False, show_progress=False
    )
    draft = compressed_draft(target, perturb=True, mode="select", primitives=["pool", "conv"]).eval()
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset)
    image_id = target.config.image_token_id
    with torch.no_grad():
        batched = trainer.compute_loss(draft, _batch(trainer, dataset))
        total, count, labelled_visual = 0.0, 0, 0
        head = target.get_output_embeddings()
        for index in range(len(dataset)):
            example = dataset[index]
            ids, labels = example["input_ids"][None], example["labels"]
            out = target(input_ids=ids, pixel_values=example["pixel_values"], output_hidden_states=True)
            hidden, logits = out.hidden_states, out.logits[0]
            visual = ids[:, 1:] == image_id
            compressed = draft.fuse_and_compress(
                hidden[0][:, 1:], hidden[-1][:, :-1], visual, grid_sizes=[[(3, 3)]]
            )
            assert compressed.n_visual_out.item() == 3
            predicted = draft(
                fused_inputs=compressed.fused, position_ids=compressed.position_ids,
                attention_mask=compressed.attention_mask,
            ).last_hidden_state[0]
            for j, s in enumerate(compressed.kept_index[0].tolist()):
                if s + 2 >= ids.shape[1] or labels[s + 2] == -100:
                    continue
                labelled_visual += int(visual[0, s])
                feature = smooth_l1_feature_loss(predicted[j], hidden[-1][0, s + 1])
                logit = soft_cross_entropy(head(predicted[j]), logits[s + 1])
                total += float(1.0 * feature + 0.1 * logit)
                count += 1
    assert labelled_visual == len(dataset)  # each image's last window predicts the first token after the image
    assert batched.item() == pytest.approx(total / count, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# token cost
# --------------------------------------------------------------------------------------------------------------------
def test_the_token_cost_gradient_reaches_the_gate(target, processor, image_dir, tmp_path):
    """Same Gumbel noise, token_cost 0 vs c: the gate gradients differ by exactly c * d mean(expected_kept)/d gate."""
    dataset = DistillationDataset(make_records(2, image_dir), processor, show_progress=False)
    base = compressed_draft(target, **CASES["select-all"]).train()
    grads, cost_grads = {}, None
    for cost in (0.0, 0.7):
        draft = copy.deepcopy(base)
        draft.compressor.config.token_cost = cost
        trainer = OnlineDistillationTrainer(
            model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset
        )
        loss, out = trainer.compute_loss(draft, _batch(trainer, dataset), return_outputs=True)
        gate = [p for _, p in sorted(draft.compressor.gate.named_parameters())]
        if cost:
            expected = out.compressor_output.expected_kept_fraction.mean()
            cost_grads = torch.autograd.grad(expected, gate, retain_graph=True)
        loss.backward()
        grads[cost] = [p.grad.clone() for p in gate]
    assert any(g.abs().max() > 1e-6 for g in cost_grads)
    for with_cost, without, cost_grad in zip(grads[0.7], grads[0.0], cost_grads, strict=True):
        torch.testing.assert_close(with_cost - without, 0.7 * cost_grad, rtol=1e-4, atol=1e-7)


def test_a_larger_token_cost_keeps_fewer_visual_tokens(target, processor, image_dir, tmp_path):
    records = make_records(4, image_dir, seed=1)
    kept = {}
    for cost in (0.0, 2.0):
        draft = compressed_draft(target, token_cost=cost, **CASES["select-all"])
        args = tiny_args(
            tmp_path / str(cost), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=6,
            learning_rate=1e-2,
        )
        trainer = OnlineDistillationTrainer(
            model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records,
            processing_class=processor,
        )
        trainer.train()
        kept[cost] = trainer.evaluate()["eval_compressor_expected_kept_fraction"]
    assert kept[2.0] < kept[0.0] - 0.02, kept


# --------------------------------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------------------------------
DETERMINISTIC = {
    # no Gumbel noise (softmax weights) and stride pruning; the gate trains through its weights (the token cost is
    # constant here: prune / pool / conv keep the same tokens)
    "weighted-stride": {"mode": "weighted", "prune_strategy": "stride", "token_cost": 0.3},
    # no gate, no randomness
    "concat": {"mode": "concat", "primitives": ["pool", "conv", "resampler"], "token_cost": 0.3},
    # Gumbel noise from the compressor's seeded CPU generator, drawn row after row in both batchings (no random
    # pruning draws in between): the same choices, and the token cost has a gradient
    "select-seeded": {"mode": "select", "primitives": ["pool", "conv", "resampler", "text_only"], "token_cost": 0.3},
}


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_gradient_accumulation_is_exact_with_a_compressor(case, target, processor, image_dir, tmp_path):
    short = make_records(1, image_dir, seed=2, answer_words=(1, 1))
    long = make_records(1, image_dir, seed=3, answer_words=(14, 14))
    # every text token is labelled, so the positions after each image (which read compressed tokens) count too
    dataset = DistillationDataset(short + long, processor, assistant_only_loss=False, show_progress=False)
    initial = compressed_draft(target, perturb=True, **DETERMINISTIC[case])
    results = train_batch_vs_accumulation(initial, target, dataset, tmp_path)
    compressor_moved = max(
        (results[0][n] - p).abs().max().item() for n, p in initial.named_parameters() if n.startswith("compressor.")
    )
    assert compressor_moved > 1e-4
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=2e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# text-only rows, every family
# --------------------------------------------------------------------------------------------------------------------
def test_text_only_rows_in_a_compressed_batch(target, processor, image_dir, tmp_path):
    records = make_records(1, image_dir, seed=6) + [text_record()]
    dataset = DistillationDataset(records, processor, show_progress=False)
    draft = compressed_draft(target, **CASES["select-all"])
    calls = record_compressor_calls(draft)
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path), train_dataset=dataset)
    draft.eval()
    counts = [int((dataset[i]["labels"][2:] != -100).sum()) for i in range(2)]
    with torch.no_grad():
        mixed = trainer.compute_loss(draft, _batch(trainer, dataset)).item()
        alone = [trainer.compute_loss(draft, _batch(trainer, dataset, [i])).item() for i in range(2)]
    assert [call["n_visual_in"] for call in calls] == [[9, 0], [9]]  # the text-only row alone skips the compressor
    # token_cost is 0: the mixed batch is the token-weighted mean of its rows
    assert mixed == pytest.approx((alone[0] * counts[0] + alone[1] * counts[1]) / sum(counts), rel=1e-5)

    draft.train()
    trainer.train()  # a mixed batch trains
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    text_only = DistillationDataset([text_record(), text_record("say hi", "blue .")], processor, show_progress=False)
    before = len(calls)
    OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path / "text"), train_dataset=text_only
    ).train()
    assert len(calls) == before  # a batch without images never calls the compressor


@pytest.mark.parametrize("family", FAMILIES)
def test_every_target_family_trains_a_compressed_draft(family, tmp_path, caplog):
    """Processor-shaped inputs of every family: grids as the decoding loop derives them, finite loss, gradients."""
    target = build_tiny_target(family)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(
        target, compressor_config=ElasticCompressorConfig(mode="concat", primitives=["pool", "conv"], **RATIOS)
    )
    calls = record_compressor_calls(draft)
    with_image = family in MULTIMODAL_FAMILIES
    batch = make_inputs(family, target, with_image=with_image, prompt_len=9)
    image_id = reserved_token_ids()["image"]
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, -100)
    labels[:, : labels.shape[1] // 2] = -100
    batch["labels"] = labels
    batch["shift_labels"] = torch.cat([labels[:, 2:], torch.full_like(labels[:, :2], -100)], dim=1)
    with caplog.at_level(logging.WARNING):
        trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=tiny_args(tmp_path))
    assert ("neither used nor trained" in caplog.text) == (family not in MULTIMODAL_FAMILIES)
    loss = trainer.compute_loss(draft, batch, num_items_in_batch=int((batch["shift_labels"] != -100).sum()))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert not any(p.grad is not None for p in target.parameters())
    if not with_image:
        assert calls == []
        return
    assert len(calls) == 1 and calls[0]["n_visual_in"][0] > 0
    expected_grids = {"llava": [(3, 3)], "qwen2_vl": [(2, 2)], "qwen2_5_vl": [(2, 2)]}
    if family in expected_grids:
        assert calls[0]["grids"] == [expected_grids[family]]
    conv = draft.compressor.branches["conv"].conv
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in draft.named_parameters()
               if not n.startswith("compressor."))


# --------------------------------------------------------------------------------------------------------------------
# saving and losslessness
# --------------------------------------------------------------------------------------------------------------------
@requires_loop
@pytest.mark.parametrize("case", ["select-all", "concat"])
def test_a_jointly_trained_draft_saves_loads_and_generates_like_the_target(
    case, target, processor, image_dir, tmp_path
):
    dataset = DistillationDataset(make_records(4, image_dir, seed=7), processor, show_progress=False)
    draft = compressed_draft(target, token_cost=0.1, **CASES[case])
    args = tiny_args(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.compressor is not None and loaded.config.compressor_config == draft.config.compressor_config
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for index in range(2):
        prompt = dataset.prompt(index)
        plain = target.generate(**prompt, max_new_tokens=10, do_sample=False)
        out = target.generate(
            **prompt, assistant_model=loaded, max_new_tokens=10, do_sample=False, return_dict_in_generate=True
        )
        assert torch.equal(out.sequences, plain)
        assert sum(out.speculation.compressor_choices.values()) == 1  # the draft's prefill went through the compressor
        if case.startswith("select"):  # one primitive keeps at most 3 of the 9 visual tokens (concat keeps 11)
            assert out.speculation.draft_prefill_tokens <= prompt["input_ids"].shape[1] - 6


def test_gate_entropy():
    uniform = torch.full((2, 4), 0.25)
    torch.testing.assert_close(gate_entropy(uniform), torch.full((2,), math.log(4)))
    sure = torch.tensor([[0.0, 1.0, 0.0]])
    assert gate_entropy(sure).item() == 0.0 and torch.isfinite(gate_entropy(sure)).all()
    assert gate_entropy(torch.zeros(3, 0)).tolist() == [0.0, 0.0, 0.0]
