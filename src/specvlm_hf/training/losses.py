# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Online-logit distillation losses and metrics (SpecVLM §3.5, Eq. 3; EAGLE-1/2 `train/main.py`).

    L_online = lambda_logit * CE(softmax(z_target), log_softmax(z_draft)) + lambda_feat * SmoothL1(f_draft, f_target)

Every function here is pure and returns **unreduced per-token values**; the trainer sums them over the loss mask with
[`masked_sum`] and divides by the number of predicted tokens in the whole (gradient-accumulated) batch, which keeps
gradient accumulation exact however many tokens each sample has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..generation.acceptance import greedy_token_ids

__all__ = [
    "chain_acceptance_length",
    "gate_entropy",
    "masked_sum",
    "smooth_l1_feature_loss",
    "soft_cross_entropy",
    "top1_agreement",
]


def soft_cross_entropy(draft_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""
    Cross-entropy of the draft distribution against the teacher distribution at temperature 1 (EAGLE's `ploss`):
    `-sum_v softmax(teacher_logits)_v * log_softmax(draft_logits)_v`. Computed in float32.

    It equals the teacher's entropy plus `KL(teacher || draft)`, so for a fixed teacher it is minimal (and its gradient
    with respect to `draft_logits` is zero) exactly when both distributions agree.

    Args:
        draft_logits (`torch.Tensor` of shape `(..., vocab)`): draft logits.
        teacher_logits (`torch.Tensor` of shape `(..., vocab)`): teacher logits over the same vocabulary (restrict
            them to a reduced draft vocabulary first; the softmax then renormalises over it).

    Returns:
        `torch.Tensor` of shape `(...)`: per-position cross-entropy (float32).
    """
    if draft_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"draft and teacher logits must have the same shape, got {tuple(draft_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    teacher_probs = F.softmax(teacher_logits.float(), dim=-1)
    draft_log_probs = F.log_softmax(draft_logits.float(), dim=-1)
    return -(teacher_probs * draft_log_probs).sum(dim=-1)


def smooth_l1_feature_loss(
    predicted_features: torch.Tensor, target_features: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    r"""
    SmoothL1 (Huber with threshold `beta`) between predicted and target features, averaged over the feature dimension
    (EAGLE's `vloss` before masking). Symmetric in its two arguments and zero exactly when they are equal. Computed in
    float32.

    Args:
        predicted_features (`torch.Tensor` of shape `(..., hidden_size)`): draft outputs.
        target_features (`torch.Tensor` of shape `(..., hidden_size)`): teacher features (the LM-head input).
        beta (`float`, *optional*, defaults to 1.0): threshold between the quadratic and the linear regime.

    Returns:
        `torch.Tensor` of shape `(...)`: per-position loss (float32).
    """
    if predicted_features.shape != target_features.shape:
        raise ValueError(
            f"predicted and target features must have the same shape, got {tuple(predicted_features.shape)} and "
            f"{tuple(target_features.shape)}"
        )
    loss = F.smooth_l1_loss(predicted_features.float(), target_features.float(), reduction="none", beta=beta)
    return loss.mean(dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""
    Sum of `values` over the positions where `mask` is true (masked positions contribute nothing, even NaN or inf).

    Args:
        values (`torch.Tensor` of shape `(...)`): per-position values.
        mask (`torch.Tensor` of shape `(...)`): boolean (or 0/1) mask of the same shape.

    Returns:
        `torch.Tensor`: a 0-d tensor.
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def top1_agreement(
    draft_logits: torch.Tensor, teacher_logits: torch.Tensor, draft_to_target: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Whether the draft's most likely token is the teacher's most likely token, per position.

    Args:
        draft_logits (`torch.Tensor` of shape `(..., draft_vocab)`): draft logits.
        teacher_logits (`torch.Tensor` of shape `(..., vocab)`): teacher logits over the **full** target vocabulary
            (a teacher choice outside a reduced draft vocabulary counts as a disagreement, as it would in decoding).
        draft_to_target (`torch.LongTensor` of shape `(draft_vocab,)`, *optional*): target id of every draft index
            (the draft's `d2t` buffer); `None` when the draft scores the full vocabulary.

    Returns:
        `torch.BoolTensor` of shape `(...)`.
    """
    # argmax's tie rule at a fraction of its CPU cost: over a (N, 49k) teacher row block argmax was 9% of a step
    draft_choice = greedy_token_ids(draft_logits)
    if draft_to_target is not None:
        draft_choice = draft_to_target.to(draft_choice.device)[draft_choice]
    return draft_choice == greedy_token_ids(teacher_logits)


def chain_acceptance_length(agreement: torch.Tensor, mask: torch.Tensor, max_depth: int) -> torch.Tensor:
    r"""
    Acceptance length a greedy **chain** of `max_depth` draft tokens would reach from every start position, estimated
    from teacher-forced top-1 agreement: `1 + sum_{k=1..max_depth} prod_{j<k} a[t + j]` with `a = agreement & mask`.
    The `1` is the bonus token the target adds at the end of every cycle (the library's convention for "acceptance
    length", see `SpeculationStats`). A chain stops at the first masked-out position.

    The estimate is optimistic in one way (teacher forcing: the draft reads teacher features at every depth instead of
    its own predictions) and pessimistic in another (a tree with `top_k > 1` also accepts non-argmax branches); the
    real value comes from `generate` (`OnlineDistillationTrainer.evaluate`).

    Args:
        agreement (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): per-position top-1 agreement.
        mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): positions that are predicted tokens.
        max_depth (`int`): longest chain (the draft's `tree_depth`).

    Returns:
        `torch.FloatTensor` of shape `(batch_size, sequence_length)`: estimated tokens per target forward when the
        cycle starts at each position (meaningful where `mask` is true).
    """
    if agreement.shape != mask.shape or agreement.dim() != 2:
        raise ValueError(
            f"agreement and mask must both be (batch_size, sequence_length), got {tuple(agreement.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    accepted = (agreement.bool() & mask.bool()).float()
    sequence_length = accepted.shape[1]
    length = torch.ones_like(accepted)
    run = torch.ones_like(accepted)
    for depth in range(max_depth):
        # run[t] = prod_{j <= depth} accepted[t + j]; positions past the end never agree
        shifted = F.pad(accepted[:, depth:], (0, min(depth, sequence_length)))
        run = run * shifted
        length = length + run
    return length


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    r"""
    Entropy (in nats) of the compressor gate's distribution over its primitives, per row: `-sum_o p_o log p_o`, with
    `0 log 0 = 0`. Ranges from 0 (a sure choice) to `log(n_options)` (uniform). Computed in float32.

    Args:
        probs (`torch.Tensor` of shape `(..., n_options)`): gate probabilities (`CompressorOutput.gate_probs`).

    Returns:
        `torch.Tensor` of shape `(...)`.
    """
    probs = probs.float()
    return -torch.where(probs > 0, probs * probs.clamp(min=1e-30).log(), torch.zeros_like(probs)).sum(dim=-1)
