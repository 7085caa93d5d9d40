"""Everything that touches the target's KV cache: support checks, per-row split, tree masks and in-place compaction.

Written against transformers 5.23's layered cache API (`cache.layers[i]` with `.keys`/`.values` of shape
`(batch, kv_heads, seq, head_dim)`, `get_mask_sizes`, `crop(-n)`). Only `DynamicLayer` and
`DynamicSlidingWindowLayer` are supported; anything else is refused with an actionable error instead of being handled
silently wrong.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

SUPPORTED_LAYERS = (DynamicLayer,)  # DynamicSlidingWindowLayer subclasses DynamicLayer


class UnsupportedCacheError(ValueError):
    """Raised for caches tree speculation cannot verify or compact (static, quantized, offloaded, linear attention)."""


def check_cache_supported(cache: Cache | None) -> None:
    """Raises `UnsupportedCacheError` unless every layer of `cache` is a dynamic (optionally sliding-window) layer."""
    if cache is None:
        raise UnsupportedCacheError("tree speculation needs a KV cache: call generate with use_cache=True.")
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"tree speculation supports DynamicCache only, got {type(cache).__name__}. Quantized, offloaded, static and "
            "linear-attention caches cannot be verified with a tree mask or compacted in place; drop "
            "`cache_implementation`/`past_key_values` (the default dynamic cache works) or generate without the draft."
        )
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise UnsupportedCacheError(
                f"cache layer {i} is a {type(layer).__name__}; tree speculation supports DynamicLayer and "
                "DynamicSlidingWindowLayer only (linear-attention/SSM states hold one state per sequence and cannot "
                "branch into a tree)."
            )


def select_row(cache: DynamicCache, row: int) -> DynamicCache:
    """
    A batch-1 view of row `row` of `cache` (tensors are copied; the original cache is left intact).

    Left padding stays in the row's cache and is masked in every later tree forward, so the row continues exactly as
    it would inside the batched plain `generate`.
    """
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        if layer.is_initialized:
            new.keys = layer.keys[row : row + 1].clone()
            new.values = layer.values[row : row + 1].clone()
        out.layers.append(new)
    return out


def tree_attention_mask(
    cache: DynamicCache,
    layer_types: list[str] | None,
    ancestors: torch.Tensor,
    depths: torch.Tensor,
    n_pad: int,
    dtype: torch.dtype,
    device: torch.device,
    padding: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """
    Additive 4-D attention mask(s) for one verification forward of `n = len(depths)` tokens (root + draft nodes).

    Call it *before* the forward: it reads the cache's current per-layer sizes.

    Args:
        cache (`DynamicCache`): the row's target cache (batch 1).
        layer_types (`list[str]`, *optional*): the text config's `layer_types` (hybrid sliding/full models).
        ancestors (`torch.BoolTensor` of shape `(n, n)`): ancestor-or-self matrix of the block.
        depths (`torch.LongTensor` of shape `(n,)`): slot depths.
        n_pad (`int`): left-padding slots at the start of the row's cache (never visible).
        dtype (`torch.dtype`): the model's compute dtype (0 = attend, `finfo(dtype).min` = masked; boolean masks are
            silently wrong under eager attention).
        device (`torch.device`): device of the mask.
        padding (`dict`, *optional*): when given, filled with `kind -> torch.BoolTensor (kv_len,)` marking the
            prefix columns that hold left padding (the exact verification attention lays keys out as plain decoding
            does, padding included).

    Returns:
        A `(1, 1, n, kv_len)` tensor, or for hybrid models a dict `{"full_attention": ..., "sliding_attention": ...}`.
    """
    n = depths.numel()
    kinds = list(dict.fromkeys(layer_types)) if layer_types else ["full_attention"]
    masks: dict[str, torch.Tensor] = {}
    for kind in kinds:
        layer_idx = layer_types.index(kind) if layer_types else 0
        layer = cache.layers[layer_idx]
        kv_len, _ = layer.get_mask_sizes(n)
        n_pre = kv_len - n
        seen = layer.get_seq_length()
        first_slot = seen - n_pre  # absolute slot of the first prefix column kept by this layer
        abs_slots = torch.arange(first_slot, seen)
        pre = (abs_slots >= n_pad)[None, :].expand(n, -1)
        if padding is not None:
            padding[kind] = torch.cat([abs_slots < n_pad, torch.zeros(n, dtype=torch.bool)])
        tree = ancestors.clone()
        if isinstance(layer, DynamicSlidingWindowLayer):
            window = layer.sliding_window
            pre = pre & (((seen + depths)[:, None] - abs_slots[None, :]) < window)
            tree = tree & ((depths[:, None] - depths[None, :]) < window)
        allowed = torch.cat([pre, tree], dim=1).to(device)
        mask = torch.zeros((1, 1, n, kv_len), dtype=dtype, device=device)
        masks[kind] = mask.masked_fill(~allowed[None, None], torch.finfo(dtype).min)
    if len(masks) == 1 and (not layer_types or len(kinds) == 1):
        return next(iter(masks.values()))
    return masks


def compact(cache: DynamicCache, n_block: int, keep: list[int]) -> None:
    """
    Keeps only verification slots `keep` (root + accepted nodes, in path order) of the last forward's `n_block` slots.

    Accepted nodes are copied in place to the front of the block (no re-rotation is needed: node `j` was computed at
    its final position) and the rest is cropped. Sliding-window layers are re-trimmed to their window by `crop`.
    """
    k = len(keep)
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    is_prefix = keep == list(range(k))
    for layer in cache.layers:
        if not layer.is_initialized or is_prefix:
            continue
        start = layer.keys.shape[-2] - n_block
        src = (start + keep_t).to(layer.keys.device)
        layer.keys[..., start : start + k, :] = layer.keys[..., src, :]
        layer.values[..., start : start + k, :] = layer.values[..., src, :]
    cache.crop(-(n_block - k))  # crop(0) still re-trims sliding-window layers


# ------------------------------------------------------------------------------------------------------------------
# batched rows (generation/batched.py): left-aligned rows, each with its own valid length
# ------------------------------------------------------------------------------------------------------------------
def batched_layout_supported(cache: DynamicCache) -> bool:
    """
    Whether every initialised layer of `cache` holds the same columns (one column per token of the batch's sequences),
    which the batched layout needs. False for a sliding-window layer already trimmed to its window (a cache carried
    over from an earlier call); the loop then decodes the rows one after another.
    """
    lengths = {layer.keys.shape[-2] for layer in cache.layers if layer.is_initialized}
    return len(lengths) <= 1


def unslide_layers(cache: DynamicCache) -> None:
    """
    Turns every `DynamicSlidingWindowLayer` of `cache` into a `DynamicLayer` holding the same tensors.

    In the batched layout rows hold different numbers of valid columns, so trimming the tensor to the last
    `sliding_window - 1` columns would drop keys a shorter row still needs; the window is enforced by the attention
    mask instead (`batched_tree_masks`). Call it right after the prefill (the loop records the past, so sliding layers
    still hold every prompt column, see `batched_layout_supported`).
    """
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            full = DynamicLayer()
            if layer.is_initialized:
                full.lazy_initialization(layer.keys, layer.values)
                full.keys, full.values = layer.keys, layer.values
            cache.layers[i] = full


def keep_rows(cache: DynamicCache, rows: torch.Tensor, width: int | None = None) -> None:
    """Keeps only batch rows `rows` (`torch.LongTensor` `(b',)`, ascending) of every layer, in place (finished rows
    stop costing), and only their first `width` columns when given (the longest remaining row)."""
    for layer in cache.layers:
        if layer.is_initialized:
            index = rows.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, index)[:, :, :width]
            layer.values = layer.values.index_select(0, index)[:, :, :width]


def compact_rows(cache: DynamicCache, dest: torch.Tensor, src: torch.Tensor, new_length: int) -> None:
    """
    Per-row compaction of the batched layout: row `b` copies its columns `src[b]` to columns `dest[b]`, then every
    layer is cut to `new_length` columns (the longest row).

    Args:
        cache (`DynamicCache`): the batched cache (no sliding-window layers, see [`unslide_layers`]).
        dest (`torch.LongTensor` of shape `(b, k)`): target columns per row; rows with fewer than `k` columns repeat
            their last `(dest, src)` pair (an identical copy, so duplicate writes agree).
        src (`torch.LongTensor` of shape `(b, k)`): source columns per row (inside the last forward's block).
        new_length (`int`): columns kept.
    """
    rows = torch.arange(dest.shape[0]).view(-1, 1)
    moved = bool((dest != src).any())
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if moved:
            device = layer.keys.device
            b, d, s = rows.to(device), dest.to(device), src.to(device)
            layer.keys[b, :, d] = layer.keys[b, :, s]
            layer.values[b, :, d] = layer.values[b, :, s]
        if layer.keys.shape[-2] > new_length:
            layer.keys = layer.keys[:, :, :new_length]
            layer.values = layer.values[:, :, :new_length]


def stack_row_caches(caches: list[DynamicCache]) -> tuple[DynamicCache, list[int]]:
    """
    One batched cache from batch-1 caches of different lengths, left-aligned (row `b`'s columns `0..len_b - 1` are
    its own, the rest is never read: the batched masks hide it). Returns the cache and each row's length.
    """
    lengths = [cache.get_seq_length() for cache in caches]
    width = max(lengths)
    out = copy.copy(caches[0])
    out.layers = []
    for i, layer in enumerate(caches[0].layers):
        new = copy.copy(layer)
        if layer.is_initialized:
            keys = layer.keys.new_zeros((len(caches), layer.keys.shape[1], width, layer.keys.shape[3]))
            values = layer.values.new_zeros((len(caches), layer.values.shape[1], width, layer.values.shape[3]))
            for b, cache in enumerate(caches):
                n = cache.layers[i].keys.shape[-2]
                keys[b, :, :n] = cache.layers[i].keys[0]
                values[b, :, :n] = cache.layers[i].values[0]
            new.keys, new.values = keys, values
        out.layers.append(new)
    return out, lengths
