# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Pure reporting helpers for the elastic visual compressor: draft prefill FLOPs, draft KV bytes, choice counts.

The draft configuration is duck-typed (any object with `hidden_size`, `intermediate_size`, `num_hidden_layers`,
`num_attention_heads` and optionally `num_key_value_heads`, `head_dim`, `target_hidden_size`, `target_layer_ids`,
e.g. `SpecVLMDraftConfig`), so these functions import nothing from the package.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _draft_dims(draft_config: Any) -> tuple[int, int, int, int, int, int]:
    hidden = int(draft_config.hidden_size)
    heads = int(draft_config.num_attention_heads)
    kv_heads = int(getattr(draft_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(draft_config, "head_dim", None) or hidden // heads)
    layers = int(getattr(draft_config, "num_hidden_layers", None) or 1)
    intermediate = int(getattr(draft_config, "intermediate_size", None) or 4 * hidden)
    return hidden, heads, kv_heads, head_dim, layers, intermediate


def draft_prefill_flops(n_tokens: int, draft_config: Any) -> int:
    r"""
    FLOPs (2 per multiply-add) of one draft prefill over `n_tokens` positions.

    Counts the input fusion (`fc`: 2H -> H, plus the multi-layer feature projection when the draft has one) and, per
    decoder layer, the q/k/v/o projections, causal attention (`QK^T` and `AV` over the `n (n + 1) / 2` causal pairs)
    and the gated MLP (3 matrices). Norms, rotary embeddings, softmax and the LM head (which a prefill applies to one
    position) are left out. Monotone in `n_tokens`: compare `draft_prefill_flops(n_uncompressed, cfg)` with
    `draft_prefill_flops(n_compressed, cfg)`.

    Args:
        n_tokens (`int`): draft prefill length (e.g. `attention_mask.sum()` before / after compression).
        draft_config: the draft's configuration (duck-typed, see the module docstring).

    Returns:
        `int`: FLOPs.
    """
    n = int(n_tokens)
    if n <= 0:
        return 0
    hidden, heads, kv_heads, head_dim, layers, intermediate = _draft_dims(draft_config)
    feature_width = int(getattr(draft_config, "target_hidden_size", None) or hidden) * len(
        getattr(draft_config, "target_layer_ids", None) or [-1]
    )
    fusion = 2 * n * (2 * hidden) * hidden
    if feature_width != hidden:
        fusion += 2 * n * feature_width * hidden
    projections = 2 * n * hidden * (heads * head_dim) * 2 + 2 * n * hidden * (kv_heads * head_dim) * 2
    causal_pairs = n * (n + 1) // 2
    attention = 2 * 2 * heads * head_dim * causal_pairs
    mlp = 2 * n * hidden * intermediate * 3
    return fusion + layers * (projections + attention + mlp)


def draft_kv_bytes(n_tokens: int, draft_config: Any, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """
    Bytes of the draft's key/value cache after a prefill of `n_tokens` positions:
    `2 (k, v) * layers * n_tokens * num_key_value_heads * head_dim * bytes_per_element`.

    Args:
        n_tokens (`int`): cached positions.
        draft_config: the draft's configuration (duck-typed).
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.bfloat16`): cache dtype, e.g. `"float16"`.

    Returns:
        `int`: bytes.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    element = torch.empty((), dtype=dtype).element_size()
    _, _, kv_heads, head_dim, layers, _ = _draft_dims(draft_config)
    return 2 * layers * max(int(n_tokens), 0) * kv_heads * head_dim * element


def compression_report(
    n_tokens_in: int, n_tokens_out: int, draft_config: Any, dtype: torch.dtype | str = torch.bfloat16
) -> dict[str, float]:
    """
    Draft prefill FLOPs and KV bytes without / with compression and their ratios, for one prompt.

    Args:
        n_tokens_in (`int`): draft prefill length without compression (e.g. `attention_mask[b].sum()` of the input).
        n_tokens_out (`int`): draft prefill length with compression (`output.attention_mask[b].sum()`).
        draft_config: the draft's configuration (duck-typed).
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.bfloat16`): KV cache dtype.

    Returns:
        `dict` with `tokens_in`, `tokens_out`, `flops_in`, `flops_out`, `flops_ratio` (out / in), `kv_bytes_in`,
        `kv_bytes_out`, `kv_ratio` (out / in); ratios are 1.0 for an empty prompt.
    """
    flops_in = draft_prefill_flops(n_tokens_in, draft_config)
    flops_out = draft_prefill_flops(n_tokens_out, draft_config)
    kv_in, kv_out = draft_kv_bytes(n_tokens_in, draft_config, dtype), draft_kv_bytes(n_tokens_out, draft_config, dtype)
    return {
        "tokens_in": int(n_tokens_in),
        "tokens_out": int(n_tokens_out),
        "flops_in": flops_in,
        "flops_out": flops_out,
        "flops_ratio": flops_out / flops_in if flops_in else 1.0,
        "kv_bytes_in": kv_in,
        "kv_bytes_out": kv_out,
        "kv_ratio": kv_out / kv_in if kv_in else 1.0,
    }


def choice_histogram(choices: torch.Tensor | Iterable[int], primitives: Sequence[str] | Any) -> dict[str, int]:
    """
    Counts the compressor's choices by primitive name.

    Args:
        choices (`torch.LongTensor` or iterable of `int`): `CompressorOutput.choice` values (possibly concatenated over
            many batches). `-1` (concat mode, no choice) is counted under `"none"`.
        primitives (`list[str]` or a config with a `primitives` field): names in gate order.

    Returns:
        `dict[str, int]`: every primitive name (zero counts included, in gate order), plus `"none"` when present.
    """
    names = list(getattr(primitives, "primitives", primitives))
    if isinstance(choices, torch.Tensor):
        choices = choices.flatten().tolist()
    histogram = {name: 0 for name in names}
    for index in choices:
        index = int(index)
        if index == -1:
            histogram["none"] = histogram.get("none", 0) + 1
        elif 0 <= index < len(names):
            histogram[names[index]] += 1
        else:
            raise ValueError(f"choice {index} is out of range for {len(names)} primitives {names}")
    return histogram


__all__ = ["draft_prefill_flops", "draft_kv_bytes", "compression_report", "choice_histogram"]
