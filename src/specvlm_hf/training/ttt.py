# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
r"""
Training-time test (EAGLE-3): pure builders of the masks, shifts and weights of a K-step unrolled draft.

The draft is trained on its own multi-step predictions, the way it is used inside a draft tree. Step 0 is the
ordinary EAGLE-1 pairing (see [`OnlineDistillationTrainer`]): draft position `t = 0 .. n-1` (`n = L - 1`) reads the
target's embedding `E[t+1]` and feature `F[t]`, predicts `h_0[t]` and is trained against the target's `P[t+1]` and
`softmax(Z[t+1])` (which predicts `x_{t+2}`).

Step `i > 0` unrolls the *chain rooted at position t*: it reads the embedding of the next true token `E[t+1+i]` and
the draft's **own** output of step `i-1` at the same index, `h_{i-1}[t]`, in place of a target feature, sits at 1-D
position `t + i` and is trained against `P[t+1+i]` and `softmax(Z[t+1+i])` (predicting `x_{t+2+i}`). This is exactly
what the tree drafter (`specvlm_hf.generation.drafter`) does at depth `i`: the root is the last context pair `t`,
every later node feeds its parent's output with its own token one position further on.

Which keys a query sees (one call of the draft per step; the keys of earlier steps come from the draft's cache):

    step-0 keys: the committed context. The chain rooted at t has the context 0 .. t, like the drafter's cache
                 after its catch-up over position t.
    step-j keys, 1 <= j <= i: the chain's own earlier nodes (its ancestors in the tree) and itself: the same index t.

For `n = 4` and step 2 (`1` = attend; query rows `t`, key columns grouped by step):

                 step-0 keys   step-1 keys   step-2 keys
                 0 1 2 3       0 1 2 3       0 1 2 3
      t = 0      1 . . .       1 . . .       1 . . .
      t = 1      1 1 . .       . 1 . .       . 1 . .
      t = 2      1 1 1 .       . . 1 .       . . 1 .
      t = 3      1 1 1 1       . . . 1       . . . 1

The step-0 block is causal (and respects padding); each later block is the diagonal (EAGLE-3's "diagonal", the same
causal-plus-diagonals layout as SpecForge's EAGLE-3 flex-attention mask; some EAGLE-3 trainers also shrink the causal
block by one more diagonal per step). Positions follow the chain (`t + j` at step `j`, where the drafter puts a node
of depth `j`), so relative distances under RoPE are those of decoding: `i - j` to the chain's step-`j` node, at least
`i` to the context. The choice here is to reproduce this library's drafter exactly (a test runs the drafter's calls
chain by chain and compares the loss), since that is what the trained draft will run.

Chains that would run past the end of the row (`t + i > n - 1`) and positions whose token `x_{t+2+i}` is not
labelled are not trained. With `K = ttt_steps` steps the loss is

    loss = sum_{i < K} ttt_decay^i * (lambda_logit * CE_i + lambda_feat * SmoothL1_i) / num_items_in_batch

where `num_items_in_batch` still counts the step-0 labelled tokens of the whole accumulated batch, so gradient
accumulation stays exact (every step's sums are sums over this micro-batch's tokens).
"""

from __future__ import annotations

import torch

__all__ = ["shift_left", "ttt_attention_mask", "ttt_loss_mask", "ttt_step_weights"]


def ttt_step_weights(ttt_steps: int, ttt_decay: float) -> list[float]:
    """
    The loss weight of each unrolled step: `[ttt_decay ** i for i in range(ttt_steps)]` (step 0 weighs exactly 1).

    Args:
        ttt_steps (`int`): number of steps `K >= 1`.
        ttt_decay (`float`): the per-step decay (EAGLE-3: 0.8).

    Returns:
        `list[float]` of length `ttt_steps`.
    """
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
    return [1.0] + [float(ttt_decay) ** i for i in range(1, ttt_steps)]


def shift_left(values: torch.Tensor, shift: int, fill: float | bool = 0) -> torch.Tensor:
    """
    `values` moved `shift` positions to the left along dimension 1, the freed tail filled with `fill`:
    `out[:, t] = values[:, t + shift]` for `t < n - shift`.

    Args:
        values (`torch.Tensor` of shape `(batch_size, n, ...)`): e.g. embeddings `(B, n, H)` or a mask `(B, n)`.
        shift (`int`): `0 <= shift`.
        fill (`float` or `bool`, *optional*, defaults to 0): value of the last `shift` positions.

    Returns:
        `torch.Tensor` of the shape and dtype of `values`.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return values
    out = torch.full_like(values, fill)
    if shift < values.shape[1]:
        out[:, : values.shape[1] - shift] = values[:, shift:]
    return out


def ttt_loss_mask(label_mask: torch.Tensor, step: int) -> torch.Tensor:
    """
    Positions trained at `step`: chain `t` counts iff `t + step < n` and `x_{t+2+step}` is labelled.

    Args:
        label_mask (`torch.BoolTensor` of shape `(batch_size, n)`): step 0's mask, `x_{t+2}` is labelled.
        step (`int`): the step `i >= 0`.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, n)`.
    """
    return shift_left(label_mask.bool(), step, fill=False)


def ttt_attention_mask(
    padding_mask: torch.Tensor | None,
    step: int,
    batch_size: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """
    The additive 4-D mask of step `step >= 1` over the keys of steps `0 .. step` (laid out step after step, as the
    draft's cache holds them): a causal block over the step-0 keys (context `0 .. t`, padding excluded), then one
    diagonal block per later step (the chain's own earlier nodes and itself). See the module docstring for a picture.

    Args:
        padding_mask (`torch.Tensor` of shape `(batch_size, length)`, *optional*): 1 for real draft positions, 0 for
            padding (the draft-position slice `attention_mask[:, 1:]` of the batch). `None`: no padding.
        step (`int`): the step `i >= 1` (step 0 uses the draft's ordinary causal mask).
        batch_size (`int`): rows `B`.
        length (`int`): draft positions `n` per step.
        dtype (`torch.dtype`): dtype of the mask (the draft's); masked entries hold its minimum.
        device (`torch.device`, *optional*): where to build it.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1, length, (step + 1) * length)`: 0 where a query attends, `finfo.min`
        elsewhere. Every row attends at least to itself (the last diagonal block), so no row is fully masked.
    """
    if step < 1:
        raise ValueError(f"ttt_attention_mask builds steps >= 1 (step 0 is causal), got {step}")
    rows = torch.arange(length, device=device)
    causal = rows[None, :] <= rows[:, None]  # (n, n): key s <= query t
    context = causal[None].expand(batch_size, -1, -1)
    if padding_mask is not None:
        context = context & padding_mask.to(device=device).bool()[:, None, :]
    diagonal = torch.eye(length, dtype=torch.bool, device=device)[None].expand(batch_size, -1, -1)
    allowed = torch.cat([context] + [diagonal] * step, dim=-1)[:, None]  # (B, 1, n, (step + 1) n)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
