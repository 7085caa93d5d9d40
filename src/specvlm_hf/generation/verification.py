# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The target's verification forward, shared by the batch-1 loop and the batched decoder (and device timing)."""

from __future__ import annotations

import time
from typing import Any

import torch

from .exact_attention import PLAN_KWARG

__all__ = ["synchronize", "verify_forward"]


def synchronize(device: torch.device) -> None:
    """Waits for the device (timing on CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify_forward(
    target: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    cache: Any,
    hidden_layer_ids: Any,
    logits_to_keep: int | torch.Tensor,
    plan: Any = None,
) -> tuple[Any, float]:
    """
    One verification forward of a tree block through the target's stock forward.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, block)`): root + tree nodes of every row.
        attention_mask (`torch.Tensor` of shape `(batch, 1, block, keys)`): the additive 4-D tree mask.
        position_ids (`torch.LongTensor` of shape `(batch, block)`, or `(3, batch, block)` with mRoPE).
        cache: the target's `DynamicCache`; the block's keys and values are appended to it.
        hidden_layer_ids: `output_hidden_states` (the feature layers the draft reads).
        logits_to_keep (`int` or `torch.Tensor`): slots whose logits the model computes (`0`: all).
        plan (`RowwisePlan`, *optional*): exact verification's per-node attention plan.

    Returns:
        `tuple`: the model output and the forward's wall seconds (device synchronised).
    """
    started = time.perf_counter()
    out = target(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=hidden_layer_ids,
        logits_to_keep=logits_to_keep,
        return_dict=True,
        **({PLAN_KWARG: plan} if plan is not None else {}),
    )
    synchronize(input_ids.device)
    return out, time.perf_counter() - started
