# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Online-logit distillation of a SpecVLM draft against a live, frozen target (SpecVLM §3.5)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainingArguments
from transformers.cache_utils import DynamicCache
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import EvalLoopOutput

from ..errors import UserValueError
from ..generation.route import is_specvlm_draft
from ..generation.visual_layout import image_grids, visual_token_ids
from ..hub import CARD_TAGS, create_model_card
from .config import OnlineDistillationConfig
from .data import (
    FAILED_RECORDS_KEY,
    IGNORE_INDEX,
    BadRecord,
    DistillationCollator,
    DistillationDataset,
    to_model_inputs,
    tokenizer_of,
)
from .losses import (
    chain_acceptance_length,
    gate_entropy,
    masked_sum,
    smooth_l1_feature_loss,
    soft_cross_entropy,
    top1_agreement,
)
from .streaming import StreamingDistillationDataset
from .ttt import shift_left, ttt_attention_mask, ttt_loss_mask, ttt_step_weights

logger = logging.getLogger(__name__)

__all__ = ["OnlineDistillationTrainer"]


def _is_iterable_dataset(data: Any) -> bool:
    """A `datasets.IterableDataset` (or any torch `IterableDataset`): records that can only be streamed."""
    return isinstance(data, torch.utils.data.IterableDataset)


class OnlineDistillationTrainer(Trainer):
    r"""
    Trains a [`SpecVLMDraftModel`] against a live, frozen target with SpecVLM's online-logit distillation (the EAGLE
    loss with the teacher run at every step instead of from dumped features):

        loss = (lambda_logit * sum_t CE(softmax(z_target), draft logits)
                + lambda_feat * sum_t SmoothL1(f_draft, f_target)) / num_items_in_batch

    **Pairing (identical to the decoding loop).** The teacher runs once on the whole sequence `x_0 .. x_{L-1}` (with
    its images). With `E = hidden_states[0]` (merged input embeddings), `F = draft.select_features(hidden_states)`,
    `P = hidden_states[-1]` (the LM-head input) and `Z` the teacher logits, draft position `t = 0 .. L-2` reads
    `(E[:, t+1], F[:, t])` at 1-D position `t`, regresses `P[:, t+1]` and is trained against `softmax(Z[:, t+1])`,
    which predicts `x_{t+2}`. Position `t` counts iff `x_{t+2}` is a labelled (assistant) token; sums run over those
    positions and are divided by their number in the whole accumulated batch, so gradient accumulation is exact.

    **Training-time test (EAGLE-3), `args.ttt_steps = K > 1`.** After step 0 above, the draft is unrolled `K - 1`
    more steps on its own predictions: step `i` reads `(E[:, t+1+i], h_{i-1}[:, t])` (its own output of the previous
    step instead of a target feature) at position `t + i`, attends to the context `0 .. t` (step-0 keys, kept in a
    `DynamicCache`) and to its own earlier steps at index `t` (a 4-D additive mask), exactly as the tree drafter runs a
    node of depth `i`, and is trained against `P[:, t+1+i]` and `softmax(Z[:, t+1+i])` where `x_{t+2+i}` is labelled.
    Step `i`'s token sums are weighted by `args.ttt_decay ** i` and share step 0's denominator, so gradient
    accumulation stays exact and `K = 1` is the loss above, unchanged. Layout and picture:
    `specvlm_hf.training.ttt`. With a multi-layer draft (several `target_layer_ids`), the draft's own output replaces
    the *projected* fused feature in the later steps. Not available with a visual compressor.

    **Visual compressor (SpecVLM §3.4), trained jointly.** When the draft has an [`ElasticVisualCompressor`]
    (`draft.compressor`), the draft is called once with `visual_mask` (position `t` is visual when `x_{t+1}` is one of
    the teacher's image / video placeholder ids) and `grid_sizes` (each image's raster grid, derived exactly as the
    decoding loop derives them for the draft's prefill), so its image spans are compressed before the decoder layer(s)
    and gradients reach the compressor's learned parts (convolution, resampler, gate). Output `j` of row `b` carries
    the prediction of position `s = compressor_output.kept_index[b, j]`; it is trained against `P[:, s+1]` and
    `softmax(Z[:, s+1])` and counts iff `x_{s+2}` is labelled and `j` is not padding. The gate follows the module's
    mode: a straight-through Gumbel-softmax sample while training, the deterministic argmax in `evaluate()` (as in
    `generate`). The loss gains the compressor's token cost

        + token_cost * sum_rows expected_kept_fraction / rows in the accumulated batch

    (`compressor.config.token_cost`, 0 by default as in the paper; rows without images contribute 0), normalised by
    rows as the token terms are by tokens, so gradient accumulation stays exact. The denominator of the token terms is
    unchanged (the labelled positions of the uncompressed batch); a labelled position whose own pair is a dropped
    visual token (only possible with `assistant_only_loss=False`) has no prediction and adds nothing. A batch without
    visual positions skips the compressor, exactly like the decoding loop. A draft without compressor trains exactly
    as without this feature.

    The teacher is kept out of the optimiser and out of checkpoints: it is a plain attribute (never a submodule of the
    draft), put in eval mode with `requires_grad_(False)` and moved to the trainer's device here (unless it was
    dispatched with a `device_map`). A PEFT teacher (LoRA, merged or not) works as is. `save_model` writes the draft
    only (config with `auto_map`, safetensors weights, the compressor's weights included) plus a model card.

    Logged metrics (train and `eval_` prefixed): `loss_logit` and `loss_feat` (per predicted token, unweighted),
    `top1_agreement` (draft argmax = teacher argmax), `est_accept_len` (teacher-forced chain estimate, bonus token
    included, see [`chain_acceptance_length`]); `evaluate()` adds the real `mean_accept_len` of tree decoding measured
    with `target.generate(..., assistant_model=draft)` on held-out prompts. With a compressor: `loss_token_cost` (the
    weighted cost term, per row) and, per row with an image, `compressor_kept_fraction` (visual tokens kept /
    visual tokens), `compressor_expected_kept_fraction` (the gate's differentiable expectation of it), and for the
    gated modes `compressor_gate_entropy` (nats, see [`gate_entropy`]) and `compressor_choice_<primitive>` (fraction
    of rows whose gate chose, or in `"weighted"` mode weighted most, each primitive). With `ttt_steps > 1`, per step
    `i >= 1` (averaged over the tokens trained at that step): `ttt<i>_loss_logit`, `ttt<i>_loss_feat` and
    `ttt<i>_top1_agreement`; the unprefixed metrics stay those of step 0. The draft's config records the recipe
    (`config.training_recipe`: `ttt_steps`, `ttt_decay`, multi-layer features, loss weights).

    Args:
        model ([`SpecVLMDraftModel`]):
            The draft to train (e.g. `SpecVLMDraftModel.from_target(target)`).
        teacher ([`~transformers.PreTrainedModel`] or `peft.PeftModel`):
            The target the draft will serve.
        args ([`OnlineDistillationConfig`], *optional*):
            Training arguments; defaults to `OnlineDistillationConfig()`.
        train_dataset ([`DistillationDataset`], [`StreamingDistillationDataset`], `str`, `list[dict]`,
            `datasets.Dataset` or `datasets.IterableDataset`, *optional*):
            Training conversations in LLaVA format (a `.json`/`.jsonl` path, records, or a ready dataset). Raw data is
            validated and wrapped with `processing_class`, `args.max_length` and `args.assistant_only_loss`; with
            `args.streaming` (and always for a `datasets.IterableDataset`) it is streamed instead
            ([`StreamingDistillationDataset`]: flat memory, bad records skipped when met; set `args.max_steps`).
        eval_dataset (same types, or a `dict` of them, *optional*):
            Held-out conversations; also the source of the acceptance-measuring prompts.
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`], *optional*):
            The **target's** processor. Needed to wrap raw data; it is not saved with the draft.
        data_collator (`Callable`, *optional*):
            Defaults to [`DistillationCollator`] with the tokenizer's pad id.
        **kwargs:
            Passed to [`~transformers.Trainer`] (`callbacks`, `optimizers`, ...).

    Example:

    ```python
    >>> import specvlm_hf
    >>> from specvlm_hf.training import OnlineDistillationConfig, OnlineDistillationTrainer

    >>> draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    >>> trainer = OnlineDistillationTrainer(
    ...     model=draft, teacher=target, args=OnlineDistillationConfig(output_dir="draft", num_train_epochs=1),
    ...     train_dataset="train.jsonl", eval_dataset="val.jsonl", processing_class=processor,
    ... )
    >>> trainer.train()
    >>> trainer.save_model()
    ```
    """

    _tag_names = CARD_TAGS["draft"]  # the one place card tags are defined (hub.py)
    # compute_loss returns token-sum / num_items_in_batch, already scaled for gradient accumulation
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel,
        teacher: nn.Module,
        args: OnlineDistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: ProcessorMixin | PreTrainedTokenizerBase | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = OnlineDistillationConfig()
        elif not isinstance(args, OnlineDistillationConfig):
            if isinstance(args, TrainingArguments):
                raise TypeError(
                    "OnlineDistillationTrainer needs an OnlineDistillationConfig (it adds the loss weights and the "
                    "remove_unused_columns=False guard); got a plain TrainingArguments."
                )
            raise TypeError(f"args must be an OnlineDistillationConfig, got {type(args).__name__}")
        if not is_specvlm_draft(model):
            raise TypeError(
                f"model must be a SpecVLM draft (SpecVLMDraftModel), got {type(model).__name__}. Build one with "
                "`SpecVLMDraftModel.from_target(target)`."
            )
        if teacher is None or teacher is model:
            raise ValueError("teacher must be the target model, distinct from the draft being trained.")
        model.check_compatible(teacher)
        if args.ttt_steps > 1 and getattr(model, "compressor", None) is not None:
            raise UserValueError(
                f"ttt_steps={args.ttt_steps} (training-time test) is not supported for a draft with a visual "
                "compressor: the compressed step 0 has fewer positions than the unrolled steps that follow it. Train "
                "the compressor with ttt_steps=1, or train a draft without compressor with the training-time test."
            )
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x's name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if args.ttt_steps > 1 and (args.gradient_checkpointing or checkpointing):
            raise UserValueError(
                f"ttt_steps={args.ttt_steps} (training-time test) keeps the earlier steps' keys in the draft's cache, "
                "which gradient checkpointing switches off: drop gradient_checkpointing (a draft of one or a few "
                "layers gains little from it) or train with ttt_steps=1."
            )
        # provenance: every checkpoint of this run records how it was trained
        model.config.training_recipe = {
            "ttt_steps": args.ttt_steps,
            "ttt_decay": args.ttt_decay,
            "multi_layer_features": len(model.config.target_layer_ids) > 1,
            "target_layer_ids": list(model.config.target_layer_ids),
            "lambda_logit": args.lambda_logit,
            "lambda_feat": args.lambda_feat,
            "feature_noise": args.feature_noise,
        }

        self.processor = processing_class
        train_dataset = self._as_distillation_dataset(train_dataset, args, "train_dataset")
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {
                name: self._as_distillation_dataset(data, args, f"eval_dataset[{name!r}]")
                for name, data in eval_dataset.items()
            }
        else:
            eval_dataset = self._as_distillation_dataset(eval_dataset, args, "eval_dataset")
        if data_collator is None:
            pad_token_id = tokenizer_of(processing_class).pad_token_id if processing_class is not None else None
            data_collator = DistillationCollator(pad_token_id=pad_token_id if pad_token_id is not None else 0)

        # The processor is the target's: it is used for data only and not saved next to the draft.
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=None,
            **kwargs,
        )
        # compute_loss consumes num_items_in_batch, so Trainer must count it for every batch
        self.model_accepts_loss_kwargs = True

        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        if getattr(teacher, "hf_device_map", None) is None and not getattr(teacher, "is_quantized", False):
            self.teacher.to(self.accelerator.device)
        first_parameter = next(self.teacher.parameters())
        self._teacher_device, self._teacher_dtype = first_parameter.device, first_parameter.dtype
        self._hidden_state_ids = sorted(set(model.feature_layer_ids) | {-1}, key=lambda i: (i < 0, i))
        # placeholder ids whose draft positions the compressor compresses (none: the draft sees every position)
        self._visual_ids = visual_token_ids(teacher) if getattr(model, "compressor", None) is not None else []
        if getattr(model, "compressor", None) is not None and not self._visual_ids:
            logger.warning(
                "This draft has a visual compressor but the teacher's config names no image or video token id, so no "
                "position is ever visual: the compressor is neither used nor trained."
            )
        self._rows_in_accumulated_batch: int | None = None  # set by get_batch_samples, normalises the token cost
        self._evaluated_dataset: Dataset | None = None  # the dataset evaluation_loop is running over
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(lambda: 0),
            "eval": defaultdict(lambda: 0),
        }
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------------------------
    def _as_distillation_dataset(self, data: Any, args: OnlineDistillationConfig, name: str) -> Dataset | None:
        if data is None or isinstance(data, (DistillationDataset, StreamingDistillationDataset)):
            return data
        if self.processor is None:
            raise ValueError(
                f"{name} is raw LLaVA-format data: pass processing_class=<the target's processor> to tokenise it, or "
                "pass a ready DistillationDataset."
            )
        if _is_iterable_dataset(data) or (args.streaming and name == "train_dataset"):
            return StreamingDistillationDataset(
                data,
                self.processor,
                max_length=args.max_length,
                assistant_only_loss=args.assistant_only_loss,
                shuffle_buffer_size=args.streaming_shuffle_buffer_size if not _is_iterable_dataset(data) else 0,
                seed=args.data_seed if args.data_seed is not None else args.seed,
            )
        return DistillationDataset(
            data,
            self.processor,
            max_length=args.max_length,
            assistant_only_loss=args.assistant_only_loss,
            show_progress=not args.disable_tqdm,
        )

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler | None:
        """`group_by_length` uses the token lengths measured during validation instead of re-encoding every item."""
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(train_dataset, DistillationDataset):
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=train_dataset.lengths
            )
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> DataLoader:
        """
        [`~transformers.Trainer.get_train_dataloader`], except for a [`StreamingDistillationDataset`] read by several
        processes: the main process reads the stream, collates the **global** batch (`per_device_train_batch_size *
        num_processes` rows, padded together) and hands each process its slice (accelerate's dispatcher with
        `split_batches`), so every process gets the same sequence length and the update equals one process with the
        global batch. (Collating per process, as the stock path does, gives batches of different lengths that the
        dispatcher cannot gather.) Records skipped by data-loader worker processes are then logged by the workers but
        not totalled.
        """
        dataset = self.train_dataset
        if not isinstance(dataset, StreamingDistillationDataset) or self.accelerator.num_processes == 1:
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        collator = self.data_collator

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collator(features)
            self._count_failed_records(batch, dataset)  # only tensors can be dispatched
            return batch

        args = self.args
        loader = DataLoader(
            dataset,
            batch_size=self._train_batch_size * self.accelerator.num_processes,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        return prepare_data_loader(
            loader,
            device=self.accelerator.device,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            split_batches=True,
            put_on_device=True,
            dispatch_batches=True,
        )

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """
        Also records the rows of the accumulated batch (the compressor's token cost is a per-row mean over them) and
        counts the records that data-loader workers had to replace (see [`DistillationDataset`]).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            self._count_failed_records(batch, self.train_dataset)
        rows = sum(int(batch["shift_labels"].shape[0]) for batch in batch_samples if "shift_labels" in batch)
        self._rows_in_accumulated_batch = rows or None
        return batch_samples, num_items_in_batch

    @staticmethod
    def _count_failed_records(batch: Any, dataset: Any) -> None:
        failures = batch.pop(FAILED_RECORDS_KEY, None) if isinstance(batch, dict) else None
        if failures and isinstance(dataset, (DistillationDataset, StreamingDistillationDataset)):
            dataset.record_failures(failures)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """
        [`~transformers.Trainer.train`], then logs the data summary again when records failed after validation
        (skipped and replaced during training, see [`DistillationDataset`]).
        """
        output = super().train(*args, **kwargs)
        dataset = self.train_dataset
        if isinstance(dataset, DistillationDataset) and dataset.failed_in_use:
            dataset.log_summary()
            output.metrics["train_records_failed_after_validation"] = sum(dataset.failed_in_use.values())
        if isinstance(dataset, StreamingDistillationDataset):  # read by the main process under accelerate
            if self.is_world_process_zero():
                dataset.log_summary()
            output.metrics["train_records_skipped"] = sum(dataset.skipped.values())
        return output

    # ------------------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------------------
    def _mrope_positions(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """
        The teacher's `(temporal, height, width)` positions `(3, B, L)` for mRoPE families (Qwen2-VL, Qwen2.5-VL), as
        `generate` computes them for the decoding loop; `None` for other families.
        """
        if batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None:
            return None
        prepare = getattr(self.teacher, "_prepare_position_ids_for_generation", None)
        if prepare is None:
            return None
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                "second_per_grid_ts")
        kwargs = {
            key: batch[key].to(self._teacher_device) if torch.is_tensor(batch[key]) else batch[key]
            for key in keys
            if batch.get(key) is not None
        }
        positions = prepare(kwargs["input_ids"], kwargs)
        return positions[-3:] if positions is not None and positions.dim() == 3 else None

    def _compression_inputs(
        self, draft: nn.Module, batch: Mapping[str, Any], device: torch.device
    ) -> dict[str, Any] | None:
        """
        `visual_mask` and `grid_sizes` of the draft positions `t = 0 .. L-2` (position `t` is visual when its paired
        token `x_{t+1}` is a visual placeholder), derived exactly as the decoding loop derives them for the draft's
        prefill; `None` when the draft has no compressor or the batch has no visual position.
        """
        input_ids = batch.get("input_ids")
        if getattr(draft, "compressor", None) is None or not self._visual_ids or input_ids is None:
            return None
        paired = input_ids[:, 1:]  # x_{t+1}
        attention_mask = batch.get("attention_mask")
        valid = torch.ones_like(paired, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
        visual = torch.isin(paired, torch.tensor(self._visual_ids, device=paired.device)) & valid
        if not bool(visual.any()):
            return None
        positions = self._mrope_positions(batch)
        paired_rows = [row.masked_fill(~row_valid, -1).cpu() for row, row_valid in zip(paired, valid)]
        paired_positions = None
        if positions is not None:
            paired_positions = [positions[:, row, 1:].cpu() for row in range(len(paired))]
        model_type = self.teacher.config.model_type
        grid_sizes = image_grids(model_type, paired_rows, self._visual_ids, paired_positions)
        return {"visual_mask": visual.to(device), "grid_sizes": grid_sizes}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """
        Runs the teacher (no grad) and the draft on one batch and returns the token-summed loss divided by
        `num_items_in_batch` (the predicted tokens of the whole accumulated batch; this batch's count when `None`),
        plus the compressor's token cost when the draft has a compressor.
        """
        mode = "train" if model.training else "eval"
        batch = {
            key: value for key, value in inputs.items() if key not in ("labels", "shift_labels", FAILED_RECORDS_KEY)
        }
        if "shift_labels" not in inputs:
            raise KeyError("the batch has no 'shift_labels': use DistillationCollator (or add them the same way).")
        teacher_inputs = to_model_inputs(batch, self._teacher_device, self._teacher_dtype)
        with torch.no_grad():
            teacher_out = self.teacher(
                **teacher_inputs, output_hidden_states=self._hidden_state_ids, use_cache=False, return_dict=True
            )
        draft = self.accelerator.unwrap_model(model)
        device = inputs["shift_labels"].device  # the draft's; a dispatched teacher may answer on another device
        hidden_states = teacher_out.hidden_states
        embeds = hidden_states[0][:, 1:].to(device)  # E[:, t + 1]
        features = draft.select_features(hidden_states)[:, :-1].to(device)  # F[:, t]
        target_features = hidden_states[-1][:, 1:].to(device)  # P[:, t + 1]
        teacher_logits = teacher_out.logits[:, 1:].to(device)  # Z[:, t + 1], predicts x_{t + 2}
        if model.training and self.args.feature_noise > 0:
            features = features + (torch.rand_like(features) - 0.5) * self.args.feature_noise

        batch_size, draft_len = embeds.shape[:2]
        mask = inputs["shift_labels"][:, :draft_len] != IGNORE_INDEX  # (B, L-1): x_{t+2} is labelled
        position_ids = torch.arange(draft_len, device=embeds.device).expand(batch_size, -1)
        attention_mask = batch.get("attention_mask")
        draft_inputs = {
            "inputs_embeds": embeds,
            "target_hidden_states": features,
            "attention_mask": attention_mask[:, 1:] if attention_mask is not None else None,
            "position_ids": position_ids,
        }
        if draft.lm_head is not None:  # the draft's own head runs inside forward (DDP / DeepSpeed see it used)
            draft_inputs["logits_mask"] = mask
        compression = self._compression_inputs(draft, batch, device)
        if compression is not None:
            draft_inputs.update(compression)  # the compressor runs inside the draft (Gumbel gate when training)
        unrolled = self.args.ttt_steps > 1 and compression is None
        if unrolled:  # the step-0 keys stay in a cache for the later steps of the training-time test
            draft_inputs.update(past_key_values=DynamicCache(), use_cache=True)
        draft_out = model(**draft_inputs)
        predicted = draft_out.last_hidden_state  # (B, L-1, hidden), or (B, L', hidden) when compressed
        compressed = draft_out.compressor_output
        num_labelled = mask.sum()
        source = None
        if compressed is not None:
            # output j of row b carries the prediction of position kept_index[b, j]: gather its targets there
            source = compressed.kept_index.clamp(min=0)
            kept = (compressed.kept_index >= 0) & compressed.attention_mask.bool()
            mask = mask.gather(1, source) & kept
            target_features = target_features.gather(1, source[..., None].expand(-1, -1, target_features.shape[-1]))

        feature_loss = smooth_l1_feature_loss(predicted, target_features)  # (B, L-1) or (B, L')
        # logits only where they are trained: (N, vocab) instead of (B, L-1, vocab)
        head = self.teacher.get_output_embeddings()
        if draft_out.logits is not None:
            draft_logits = draft_out.logits
        else:  # the target's head: its device and dtype
            selected = predicted[mask].to(head.weight.device, head.weight.dtype)
            draft_logits = draft.compute_logits(selected, head).to(device)
        if source is None:
            teacher_selected = teacher_logits[mask]
        else:
            rows, columns = mask.nonzero(as_tuple=True)
            teacher_selected = teacher_logits[rows, source[rows, columns]]
        d2t = draft.d2t.to(device) if draft.d2t is not None else None
        logit_loss = soft_cross_entropy(draft_logits, teacher_selected if d2t is None else teacher_selected[:, d2t])

        logit_sum = logit_loss.sum()
        feature_sum = masked_sum(feature_loss, mask)
        num_tokens = mask.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_labelled
        if torch.is_tensor(denominator):
            denominator = denominator.to(feature_sum.device).clamp(min=1)
        else:
            denominator = max(int(denominator), 1)
        loss = (self.args.lambda_logit * logit_sum + self.args.lambda_feat * feature_sum) / denominator
        if unrolled:
            loss = loss + self._ttt_loss(
                draft,
                mode,
                predicted,
                draft_out.past_key_values,
                embeds,
                target_features,
                teacher_logits,
                inputs["shift_labels"][:, :draft_len] != IGNORE_INDEX,
                draft_inputs["attention_mask"],
                position_ids,
                head,
                d2t,
                denominator,
            )

        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens while DDP averages gradients over processes
            loss = loss * self.accelerator.num_processes

        compressor = getattr(draft, "compressor", None)
        cost_sum = None
        if compressed is not None:
            # token_cost * mean over the rows of the accumulated batch of expected_kept_fraction (0 without images)
            token_cost = float(compressor.config.token_cost)
            cost_sum = token_cost * compressed.expected_kept_fraction.sum()
            if token_cost > 0:
                training = model.training and num_items_in_batch is not None
                accumulated_rows = self._rows_in_accumulated_batch if training else None
                loss = loss + cost_sum.to(loss.device) / (accumulated_rows or batch_size)

        with torch.no_grad():
            agreement = top1_agreement(draft_logits, teacher_selected, d2t)
            agreement_grid = torch.zeros_like(mask)
            agreement_grid[mask] = agreement
            accept = chain_acceptance_length(agreement_grid, mask, draft.config.tree_depth)
            self._accumulate(
                mode,
                tokens=num_tokens,
                loss_logit=logit_sum,
                loss_feat=feature_sum,
                top1_agreement=agreement.sum(),
                est_accept_len=masked_sum(accept, mask),
            )
            if compressor is not None:
                self._accumulate_compressor(mode, compressor.config, compressed, cost_sum, batch_size)
        return (loss, draft_out) if return_outputs else loss

    def _ttt_loss(
        self,
        draft: nn.Module,
        mode: str,
        predicted: torch.Tensor,
        cache: DynamicCache,
        embeds: torch.Tensor,
        target_features: torch.Tensor,
        teacher_logits: torch.Tensor,
        label_mask: torch.Tensor,
        padding_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        head: nn.Module,
        d2t: torch.Tensor | None,
        denominator: torch.Tensor | int,
    ) -> torch.Tensor:
        """
        The steps `i = 1 .. ttt_steps - 1` of the training-time test (EAGLE-3; layout, masks and weights in
        `specvlm_hf.training.ttt`), already weighted by `ttt_decay ** i`, scaled like step 0 and divided by
        `denominator`.

        Args:
            draft (`SpecVLMDraftModel`): the unwrapped draft. The later steps call it directly: they reuse the step-0
                parameters, whose gradients a DDP / DeepSpeed wrapper collects once per backward whichever call used
                them.
            mode (`str`): `"train"` or `"eval"` (where the metrics go).
            predicted (`torch.Tensor` of shape `(B, n, hidden)`): step 0's output `h_0`.
            cache (`DynamicCache`): the draft's cache holding step 0's keys and values; each step appends its own.
            embeds (`torch.Tensor` of shape `(B, n, hidden)`): `E[:, t + 1]`.
            target_features (`torch.Tensor` of shape `(B, n, hidden)`): `P[:, t + 1]`.
            teacher_logits (`torch.Tensor` of shape `(B, n, vocab)`): `Z[:, t + 1]`.
            label_mask (`torch.BoolTensor` of shape `(B, n)`): `x_{t + 2}` is labelled.
            padding_mask (`torch.Tensor` of shape `(B, n)`, *optional*): real draft positions.
            position_ids (`torch.LongTensor` of shape `(B, n)`): step 0's positions.
            head (`nn.Module`): the target's LM head (used when the draft has no head of its own).
            d2t (`torch.LongTensor`, *optional*): the draft vocabulary's target ids.
            denominator (`torch.Tensor` or `int`): the labelled step-0 tokens of the accumulated batch.

        Returns:
            `torch.Tensor`: a scalar, the sum over the later steps.
        """
        batch_size, length = label_mask.shape
        weights = ttt_step_weights(self.args.ttt_steps, self.args.ttt_decay)
        total = predicted.new_zeros((), dtype=torch.float32)
        hidden = predicted
        for step in range(1, self.args.ttt_steps):
            mask = ttt_loss_mask(label_mask, step)
            out = draft(
                inputs_embeds=shift_left(embeds, step),  # E[:, t + 1 + step]
                target_hidden_states=hidden,  # h_{step - 1}[:, t]: the draft's own feature
                attention_mask=ttt_attention_mask(
                    padding_mask, step, batch_size, length, hidden.dtype, hidden.device
                ),
                position_ids=position_ids + step,
                past_key_values=cache,
                use_cache=True,
                logits_mask=mask,
            )
            hidden = out.last_hidden_state
            rows, columns = mask.nonzero(as_tuple=True)
            feature_sum = masked_sum(smooth_l1_feature_loss(hidden, shift_left(target_features, step)), mask)
            if out.logits is not None:
                draft_logits = out.logits
            else:
                selected = hidden[rows, columns].to(head.weight.device, head.weight.dtype)
                draft_logits = draft.compute_logits(selected, head).to(hidden.device)
            teacher_selected = teacher_logits[rows, columns + step]
            if d2t is not None:
                teacher_selected = teacher_selected[:, d2t]
            logit_sum = soft_cross_entropy(draft_logits, teacher_selected).sum()
            total = total + weights[step] * (
                self.args.lambda_logit * logit_sum + self.args.lambda_feat * feature_sum
            )
            with torch.no_grad():
                self._accumulate(
                    mode,
                    **{
                        f"ttt{step}_tokens": mask.sum(),
                        f"ttt{step}_loss_logit": logit_sum,
                        f"ttt{step}_loss_feat": feature_sum,
                        f"ttt{step}_top1_agreement": top1_agreement(
                            draft_logits, teacher_logits[rows, columns + step], d2t
                        ).sum(),
                    },
                )
        return total / denominator

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation step: the per-token loss of the batch (there are no predictions to gather)."""
        self._count_failed_records(inputs, self._evaluated_dataset)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------------------------------------
    def _accumulate(self, mode: str, **sums: torch.Tensor) -> None:
        for key, value in sums.items():
            self._metric_sums[mode][key] = self._metric_sums[mode][key] + value.detach().double()

    def _accumulate_compressor(
        self,
        mode: str,
        config: Any,
        compressed: Any,
        cost_sum: torch.Tensor | None,
        batch_size: int,
    ) -> None:
        """
        Sums of the compressor's metrics: the token cost per row (`rows`), and per row with an image (`image_rows`)
        the realised and expected kept fractions of its visual tokens, the gate's entropy and its choice counts.
        """
        device = self.accelerator.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {"rows": torch.tensor(float(batch_size), dtype=torch.float64, device=device)}
        sums["loss_token_cost"] = cost_sum if cost_sum is not None else zero
        if compressed is not None:
            images = compressed.n_visual_in > 0
            kept = compressed.n_visual_out.double() / compressed.n_visual_in.double().clamp(min=1)
            sums["image_rows"] = images.sum()
            sums["compressor_kept_fraction"] = kept[images].sum()
            sums["compressor_expected_kept_fraction"] = compressed.expected_kept_fraction[images].sum()
            if config.uses_gate:
                sums["compressor_gate_entropy"] = gate_entropy(compressed.gate_probs)[images].sum()
                choice = compressed.choice[images]
                for index, name in enumerate(config.primitives):
                    sums[f"compressor_choice_{name}"] = (choice == index).sum()
        self._accumulate(mode, **sums)

    @staticmethod
    def _metric_count(key: str) -> str:
        """
        The count a summed metric is averaged over: predicted tokens, rows, rows with an image, or the tokens trained
        at step `i` of the training-time test (`ttt<i>_tokens` for the `ttt<i>_*` metrics).
        """
        if key.startswith("ttt"):
            return key.split("_", 1)[0] + "_tokens"
        if key == "loss_token_cost":
            return "rows"
        return "image_rows" if key.startswith("compressor_") else "tokens"

    @staticmethod
    def _is_ttt_count(key: str) -> bool:
        return key.startswith("ttt") and key.endswith("_tokens")

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        """
        Averages of the accumulated sums over all processes (per predicted token; the token cost per row; the
        compressor's metrics per row with an image); clears them.
        """
        sums = self._metric_sums[mode]
        if not sums:
            return {}
        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[key], dtype=torch.float64) for key in keys])
        values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()
        sums.clear()
        totals = dict(zip(keys, values.tolist(), strict=True))
        count_keys = [key for key in keys if key in ("tokens", "rows", "image_rows") or self._is_ttt_count(key)]
        counts = {key: totals.pop(key) for key in count_keys}
        if counts["tokens"] <= 0:
            return {}
        return {
            key: value / counts[self._metric_count(key)]
            for key, value in totals.items()
            if counts.get(self._metric_count(key), 0) > 0
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the training metrics accumulated since the last log to periodic training logs."""
        if "loss" in logs:
            logs = {**logs, **self._flush_metrics("train")}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """
        [`~transformers.Trainer.evaluate`] plus the distillation metrics and, when `args.eval_acceptance_prompts > 0`,
        the real mean acceptance length of tree decoding (`{prefix}_mean_accept_len`, bonus token included).
        `eval_dataset` may be raw LLaVA-format data (it is wrapped like the constructor's).
        """
        if eval_dataset is not None and not isinstance(eval_dataset, (str, Mapping)):
            eval_dataset = self._as_distillation_dataset(eval_dataset, self.args, "eval_dataset")
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def evaluation_loop(
        self,
        dataloader: DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        self._metric_sums["eval"].clear()
        self._evaluated_dataset = dataloader.dataset
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self._evaluated_dataset = None
        metrics = self._flush_metrics("eval")
        dataset = dataloader.dataset
        if self.args.eval_acceptance_prompts > 0 and isinstance(dataset, DistillationDataset):
            metrics.update(self.measure_acceptance(dataset))
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
        return output

    @torch.no_grad()
    def measure_acceptance(
        self, dataset: DistillationDataset, num_prompts: int | None = None, max_new_tokens: int | None = None
    ) -> dict[str, float]:
        """
        Measures the real acceptance of the draft: greedy `teacher.generate(**prompt, assistant_model=draft)` on the
        first `num_prompts` prompts of `dataset` (records cut before their first assistant turn), prompts split over
        processes. A prompt whose record fails now (an image deleted since validation) is skipped and counted in
        `dataset.failed_in_use`.

        Args:
            dataset ([`DistillationDataset`]): source of the prompts.
            num_prompts (`int`, *optional*): defaults to `args.eval_acceptance_prompts`.
            max_new_tokens (`int`, *optional*): defaults to `args.eval_acceptance_max_new_tokens`.

        Returns:
            `dict[str, float]`: `mean_accept_len` (tokens per target forward, bonus token included),
            `mean_accepted_draft_tokens` (bonus excluded), `acceptance_prompts` (prompts measured) and
            `acceptance_max_new_tokens`.
        """
        num_prompts = min(self.args.eval_acceptance_prompts if num_prompts is None else num_prompts, len(dataset))
        max_new_tokens = self.args.eval_acceptance_max_new_tokens if max_new_tokens is None else max_new_tokens
        draft = self.accelerator.unwrap_model(self.model)
        was_training = draft.training
        draft.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # target forwards, tokens emitted, accepted draft tokens, prompts
        try:
            for index in range(self.accelerator.process_index, num_prompts, self.accelerator.num_processes):
                try:
                    prompt = dataset.prompt(index)
                except BadRecord as bad:
                    dataset.record_failures([(dataset.record_index(index), bad.reason, bad.detail)])
                    continue
                prompt = to_model_inputs(prompt, self._teacher_device, self._teacher_dtype)
                out = self.teacher.generate(
                    **prompt,
                    assistant_model=draft,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    return_dict_in_generate=True,
                )
                stats = out.speculation
                totals += torch.tensor(
                    [stats.target_forwards, stats.tokens_emitted, stats.accepted_draft_tokens, 1], dtype=torch.float64
                )
        finally:
            draft.train(was_training)
        totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        forwards, emitted, accepted, measured = totals.tolist()
        metrics = {"acceptance_prompts": measured, "acceptance_max_new_tokens": float(max_new_tokens)}
        if forwards > 0:
            metrics["mean_accept_len"] = emitted / forwards
            metrics["mean_accepted_draft_tokens"] = accepted / forwards
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # saving and the Hub
    # ------------------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the draft (never the teacher, nor the target's processor) and its model card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self._write_model_card(output_dir)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        speedup: float | None = None,
        speedup_setup: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Writes (or updates) `README.md` in `args.output_dir` with the project's card renderer (`hub_cards/draft.md`
        through [`specvlm_hf.hub.create_model_card`]): target as `base_model`, quick start with
        `target.generate(..., assistant_model=draft)`, training data and procedure, the acceptance length measured
        after each evaluation and, when given, a measured speedup; the last acceptance length and the speedup are also
        `model-index` results of the card's metadata.

        Args:
            model_name (`str`, *optional*): card title; defaults to the Hub id or the output directory name.
            dataset_name (`str`, *optional*): name of the training data; defaults to the training file's name.
            tags (`str` or `list[str]`, *optional*): extra tags.
            speedup (`float`, *optional*): measured end-to-end speedup over plain decoding.
            speedup_setup (`str`, *optional*): how the speedup was measured (hardware, dtype, prompts).
            **kwargs: accepted for compatibility with [`~transformers.Trainer.push_to_hub`] and ignored.
        """
        if not self.is_world_process_zero():
            return
        self._write_model_card(
            self.args.output_dir,
            model_name=model_name,
            dataset_name=dataset_name,
            tags=[tags] if isinstance(tags, str) else tags,
            speedup=speedup,
            speedup_setup=speedup_setup,
        )

    def _write_model_card(
        self,
        directory: str,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: list[str] | None = None,
        speedup: float | None = None,
        speedup_setup: str | None = None,
    ) -> None:
        """Writes or updates the draft card in `directory` from the training state (see [`create_model_card`])."""
        hub_model_id = self.hub_model_id or self.args.hub_model_id
        if model_name is None:
            model_name = (
                hub_model_id.split("/")[-1]
                if hub_model_id
                else os.path.basename(os.path.abspath(self.args.output_dir))
            )
        train = self.train_dataset if isinstance(self.train_dataset, DistillationDataset) else None
        if dataset_name is None and train is not None and train.source is not None:
            dataset_name = os.path.basename(train.source)
        measured = [entry for entry in self.state.log_history if "eval_mean_accept_len" in entry]
        acceptance = measured[-1] if measured else None
        create_model_card(
            self.accelerator.unwrap_model(self.model),
            directory,
            model_name=model_name,
            model_id=hub_model_id,
            dataset_name=dataset_name,
            data_summary=(
                f"{len(train)} usable of {train.num_records} records ({train.skip_summary()})" if train else None
            ),
            training=self._training_summary(),
            mean_accept_len=acceptance["eval_mean_accept_len"] if acceptance else None,
            acceptance_setup=(
                f"greedy, {int(acceptance['eval_acceptance_prompts'])} held-out prompts, max_new_tokens="
                f"{int(acceptance['eval_acceptance_max_new_tokens'])}, step {acceptance['step']}"
                if acceptance
                else None
            ),
            speedup=speedup,
            speedup_setup=speedup_setup,
            accept_len_by_epoch=[
                (entry["epoch"], entry["eval_mean_accept_len"]) for entry in measured if "epoch" in entry
            ],
            tags=tags,
        )

    def _training_summary(self) -> dict[str, Any]:
        args = self.args
        loss = f"{args.lambda_logit} x soft CE (T=1) + {args.lambda_feat} x SmoothL1 (online teacher)"
        if args.ttt_steps > 1:
            loss += f"; training-time test (EAGLE-3): {args.ttt_steps} steps, step i weighted {args.ttt_decay}^i"
        compressor = getattr(self.accelerator.unwrap_model(self.model), "compressor", None)
        if compressor is not None:
            loss += f"; elastic compressor (`{compressor.config.mode}` mode) trained jointly"
            if compressor.config.token_cost:
                loss += f", + {compressor.config.token_cost} x expected kept visual fraction"
        return {
            "loss": loss,
            "learning_rate": args.learning_rate,
            "epochs": args.num_train_epochs,
            "global_steps": self.state.global_step,
            "batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "optimizer": f"{getattr(args.optim, 'value', args.optim)} (betas {args.adam_beta1}, {args.adam_beta2}, "
            f"weight decay {args.weight_decay})",
            "feature_noise": args.feature_noise,
            "max_length": args.max_length,
            "assistant_only_loss": args.assistant_only_loss,
        }
