"""Exact verification attention: a tree forward whose attention reproduces plain one-token decoding bit for bit.

Why. In reduced precision a multi-token SDPA call rounds differently from the one-token call plain decoding makes
(PyTorch's CPU kernel blocks queries and keys by the call's shape), so greedy tree speculation in bf16 can flip a
near-tie token that plain `generate` would not. Every other op of a decoder layer (linear layers on CPUs whose bf16 GEMM
is row-invariant, norms, rotary embeddings, the LM head applied row by row) already gives each row what a one-row call
gives it; [`probe_exact_verification`] checks that on the machine at first use.

How. During a verification forward every tree node is attended as its own query of length 1 over exactly the keys
plain decoding would hold at that point (the visible prefix, then the node's ancestors and itself, in that order), with
the mask plain decoding would pass, through transformers' own `sdpa_attention_forward`. The keys are laid out without
copying the prefix: the block's keys are saved once per layer, each node's path is written over the block's first slots
of the key/value tensors the layer was handed (nodes are visited parents first, so consecutive nodes share most of the
path and only the tail is rewritten), and the block is restored afterwards, so the cache ends exactly as a stock
forward leaves it.

Where. The function is registered with transformers' `AttentionInterface` (and `AttentionMaskInterface`, as `sdpa`'s
mask) under [`EXACT_ATTENTION`]; the loop selects it for the target's text model for the duration of one generate call
([`exact_attention_selected`]) and hands each verification forward its [`RowwisePlan`] as the `specvlm_rows` keyword.
Any forward without a plan (the prefill, other callers) runs stock SDPA unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: Name under which the exact verification attention is registered.
EXACT_ATTENTION = "specvlm_exact_sdpa"
#: Keyword that carries a verification forward's [`RowwisePlan`] down to the attention function.
PLAN_KWARG = "specvlm_rows"


@dataclass
class _MaskPlan:
    """How to attend every query row under one mask kind (full or sliding): see [`RowwisePlan`]."""

    prefix: int  # key columns before the block
    starts: list[int]  # first prefix column of each row's keys (padding included, as plain decoding holds it)
    lengths: list[int]  # path length (ancestors + self) of each row
    writes: list[tuple[int, torch.Tensor] | None]  # (first block slot to rewrite, source slots) before each row
    order: list[int]  # rows in visiting order
    gathers: list[torch.Tensor | None]  # key columns of rows not laid out as plain decoding lays them (gathered)
    row_masks: list[torch.Tensor | None]  # boolean key mask plain decoding passes (padding), None when it passes none


@dataclass
class _BatchPlan:
    """Plans of a batched verification forward (`generation/batched.py`): one [`_MaskPlan`] per batch row, built from
    the row's mask with its unused columns (`valid[b]` .. `span`) cut out, i.e. the mask the row has at batch size 1;
    the row's path is laid out right after its valid columns, and its block (from column `span`) is restored after."""

    span: int  # key columns before the block (the widest row)
    valid: list[int]  # valid key columns of each row
    rows: list[_MaskPlan]


@dataclass
class RowwisePlan:
    """
    The per-row attention layout of one verification forward, built once from its additive mask(s) and shared by every
    layer.

    Args:
        masks (`dict[int, _MaskPlan]`): plan per mask tensor (keyed by `data_ptr`, as each layer receives its kind's
            mask tensor).
    """

    masks: dict[int, _MaskPlan | _BatchPlan] = field(default_factory=dict)

    @classmethod
    def from_masks(
        cls,
        masks: torch.Tensor | dict[str, torch.Tensor],
        padding: dict[str, torch.Tensor] | None = None,
        padded_batch: bool = False,
        valid: list[int] | None = None,
    ) -> "RowwisePlan":
        """
        Args:
            masks (`torch.FloatTensor` of shape `(b, 1, n, kv_len)` or a dict of them by kind): the verification
                forward's additive masks (0 = attend), as built by `tree_attention_mask` (`b = 1`) or by the batched
                loop.
            padding (`dict[str, torch.BoolTensor]`, *optional*): per kind, the key columns holding left padding,
                `(kv_len,)` (`tree_attention_mask(..., padding=...)`) or `(b, kv_len)` (batched).
            padded_batch (`bool`, *optional*): whether the generate call's batch had padding: plain decoding then
                passes every row a boolean padding mask (and keeps the padded keys), otherwise no mask.
            valid (`list[int]`, *optional*): batched forwards only: per row, its valid key columns before the block
                (the batched layout of `generation/batched.py`: columns from `valid[b]` to the block are unused).
        """
        items = masks.items() if isinstance(masks, dict) else [("full_attention", masks)]
        plan = cls()
        for kind, mask in items:
            pad = padding.get(kind) if padding else None
            if valid is None:
                if mask.shape[0] != 1:
                    raise ValueError("a batched verification mask needs the rows' valid lengths (`valid`)")
                plan.masks[mask.data_ptr()] = _plan_for(mask, pad, padded_batch)
                continue
            n = mask.shape[2]
            span = mask.shape[-1] - n
            rows = []
            for b, length in enumerate(valid):
                row_mask = torch.cat([mask[b : b + 1, :, :, :length], mask[b : b + 1, :, :, span:]], dim=-1)
                row_pad = None if pad is None else torch.cat([pad[b, :length], pad[b, span:]])
                rows.append(_plan_for(row_mask, row_pad, padded_batch, in_place=length == span))
            plan.masks[mask.data_ptr()] = _BatchPlan(span, list(valid), rows)
        return plan


def _plan_for(mask: torch.Tensor, pad: torch.Tensor | None, padded_batch: bool, in_place: bool = True) -> _MaskPlan:
    """One sequence's plan; `in_place`: the block's keys already sit right after the prefix (False for a batched row
    shorter than the widest one: its path is written over unused columns, every position of it)."""
    allowed = (mask[0, 0] == 0).cpu()
    n, kv_len = allowed.shape
    prefix = kv_len - n
    pad = torch.zeros(kv_len, dtype=torch.bool) if pad is None else pad.cpu()
    held = allowed | pad[None]  # the keys plain decoding holds for the row (padding masked, not dropped)
    starts, lengths, gathers, row_masks = [], [], [], []
    paths: list[list[int]] = []
    for row in range(n):
        cols = torch.nonzero(held[row], as_tuple=False).flatten()
        pre = cols[cols < prefix]
        path = (cols[cols >= prefix] - prefix).tolist()
        start = int(pre[0]) if pre.numel() else prefix
        contiguous = pre.numel() == prefix - start and path == sorted(path)
        starts.append(start)
        lengths.append(len(path))
        paths.append(path)
        gathers.append(None if contiguous else torch.nonzero(allowed[row], as_tuple=False).flatten())
        if padded_batch:
            row_masks.append((~pad[cols]).view(1, 1, 1, -1).to(mask.device))
        else:
            row_masks.append(None)
    # visit rows parents first (slot order: a node's ancestors have smaller slots); rewrite only the differing tail
    order = list(range(n))
    writes: list[tuple[int, torch.Tensor] | None] = [None] * n
    current = list(range(n)) if in_place else [-1] * n  # which block slot's keys sit at each position right now
    for row in order:
        path = paths[row]
        first = next((j for j, slot in enumerate(path) if current[j] != slot), len(path))
        if first < len(path) and gathers[row] is None:
            writes[row] = (first, torch.tensor(path[first:], dtype=torch.long))
            current[first : len(path)] = path[first:]
    return _MaskPlan(prefix, starts, lengths, writes, order, gathers, row_masks)


def _row_mask(layout: _MaskPlan, row: int, length: int, sliding_window: int | None, like: torch.Tensor):
    """
    The mask plain one-token decoding passes for this row: the padding mask of a padded batch; without padding none,
    unless a sliding window applies (transformers then always passes one).
    """
    if layout.row_masks[row] is not None:
        return layout.row_masks[row]
    if sliding_window is not None and length >= sliding_window:
        return torch.ones((1, 1, 1, length), dtype=torch.bool, device=like.device)
    return None


def exact_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    `sdpa_attention_forward`, except in a verification forward (a [`RowwisePlan`] in `kwargs["specvlm_rows"]`), where
    every query row is attended as plain one-token decoding would attend it (see the module docstring).

    Args:
        query (`torch.FloatTensor` of shape `(b, heads, n, head_dim)`), key / value (`(b, kv_heads, kv_len,
            head_dim)`): as transformers' attention functions receive them; key/value may be the cache's own tensors:
            the block is restored exactly before returning (a batched row's unused columns may be left overwritten).
        attention_mask (`torch.FloatTensor` of shape `(b, 1, n, kv_len)`): the verification mask of this layer's kind
            (`b > 1`: a batched forward, planned row by row, see [`RowwisePlan.from_masks`]).

    Returns:
        `(attn_output, None)` with `attn_output` of shape `(b, n, heads, head_dim)`.
    """
    plan: RowwisePlan | None = kwargs.pop(PLAN_KWARG, None)
    if plan is None or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layout = plan.masks.get(attention_mask.data_ptr())
    if layout is None:
        raise RuntimeError("exact verification attention got a mask it has no plan for")
    if isinstance(layout, _BatchPlan):
        out = query.new_empty((query.shape[0], query.shape[2], query.shape[1], value.shape[-1]))
        for b, row_layout in enumerate(layout.rows):
            out[b : b + 1] = _attend_rows(module, query[b : b + 1], key[b : b + 1], value[b : b + 1], row_layout,
                                          layout.span, kwargs)
        return out, None
    if query.shape[0] != 1:
        raise RuntimeError("exact verification attention got a batched forward with a batch-1 plan")
    return _attend_rows(module, query, key, value, layout, layout.prefix, kwargs), None


def _attend_rows(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 layout: _MaskPlan, block_start: int, kwargs: dict) -> torch.Tensor:
    """
    Every query row of one sequence attended as plain one-token decoding attends it.

    Args:
        query (`(1, heads, n, head_dim)`), key / value (`(1, kv_heads, kv_len, head_dim)`, views of the cache's own
            tensors): the block's keys start at column `block_start`; each row's path is written from column
            `layout.prefix` on (`layout.prefix <= block_start`: a batched row writes over its unused columns too) and
            the block is restored before returning.

    Returns:
        `torch.FloatTensor` of shape `(1, n, heads, head_dim)`.
    """
    sliding_window = kwargs.get("sliding_window")
    # plain decoding's own call for an unmasked one-token query (sdpa_attention_forward with attention_mask=None):
    # made directly, without the wrapper's per-call checks, when nothing else (bias, softcap, dropout) is involved
    direct = (kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not kwargs.get("dropout")
              and not kwargs.get("output_attentions"))
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = {"enable_gqa": True} if groups > 1 else {}
    scaling = kwargs.get("scaling")
    prefix = layout.prefix
    n = query.shape[2]
    saved_k, saved_v = key[:, :, block_start:].clone(), value[:, :, block_start:].clone()
    out = query.new_empty((1, n, query.shape[1], value.shape[-1]))
    try:
        for row in layout.order:
            gather = layout.gathers[row]
            if gather is not None:  # not laid out as plain decoding would: gather the row's keys (a copy)
                full_k = torch.cat([key[:, :, :prefix], saved_k], dim=2)
                full_v = torch.cat([value[:, :, :prefix], saved_v], dim=2)
                k_row, v_row = full_k[:, :, gather], full_v[:, :, gather]
                row_mask = None
            else:
                write = layout.writes[row]
                if write is not None:
                    first, source = write
                    end = prefix + first + source.numel()
                    key[:, :, prefix + first : end] = saved_k[:, :, source]
                    value[:, :, prefix + first : end] = saved_v[:, :, source]
                start, stop = layout.starts[row], prefix + layout.lengths[row]
                k_row, v_row = key[:, :, start:stop], value[:, :, start:stop]
                row_mask = _row_mask(layout, row, stop - start, sliding_window, query)
            if row_mask is None and direct:
                o = F.scaled_dot_product_attention(query[:, :, row : row + 1], k_row, v_row, attn_mask=None,
                                                   dropout_p=0.0, scale=scaling, is_causal=False, **gqa)
                out[0, row] = o[0, :, 0]
            else:
                o, _ = sdpa_attention_forward(module, query[:, :, row : row + 1], k_row, v_row, row_mask, **kwargs)
                out[:, row] = o[:, 0]
    finally:
        key[:, :, block_start:] = saved_k
        value[:, :, block_start:] = saved_v
    return out


AttentionInterface.register(EXACT_ATTENTION, exact_sdpa_attention)
AttentionMaskInterface.register(EXACT_ATTENTION, sdpa_mask)

_selection_lock = threading.Lock()
_selection_depth: dict[int, tuple[int, str]] = {}


@contextlib.contextmanager
def exact_attention_selected(target: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """
    Selects [`EXACT_ATTENTION`] for `target`'s text model (only when it runs `sdpa`) for the duration of the block and
    restores the previous implementation afterwards (nested and concurrent generate calls on one model are counted).
    Yields whether it is selected. Forwards without a plan are stock SDPA, so other users of the model are unaffected.
    """
    config = target.config.get_text_config()
    key = id(config)
    with _selection_lock:
        depth, previous = _selection_depth.get(key, (0, config._attn_implementation))
        active = enabled and (depth > 0 or previous == "sdpa")
        if active:
            if depth == 0:
                config._attn_implementation = EXACT_ATTENTION
            _selection_depth[key] = (depth + 1, previous)
    try:
        yield active
    finally:
        if active:
            with _selection_lock:
                depth, previous = _selection_depth[key]
                if depth == 1:
                    config._attn_implementation = previous
                    del _selection_depth[key]
                else:
                    _selection_depth[key] = (depth - 1, previous)


# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExactnessProbe:
    """Result of [`probe_exact_verification`]: whether exact verification holds here, and if not, which op breaks it."""

    exact: bool
    reason: str = ""


_PROBES: dict[tuple, ExactnessProbe] = {}


def probe_exact_verification(
    device: torch.device | str, dtype: torch.dtype, hidden_size: int = 576, max_rows: int = 65
) -> ExactnessProbe:
    """
    Checks, once per (device, dtype, width), that the kernels give every row of a multi-row call what a one-row call
    gives it, which exact verification relies on:

    - `F.linear`: each of `M` rows (M = 2 … `max_rows`) equals the same row computed alone;
    - attention: one query row over a key view of a larger tensor (how the exact path lays keys out) equals the call
      over a fresh contiguous copy of the same keys.

    fp32 GEMMs on CPUs are usually *not* row-invariant (differences near 1e-7), bf16 GEMMs with AMX/AVX512-BF16 are;
    without exactness the loop still runs the fast path (lossless up to floating-point rounding at near-ties).
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype, hidden_size, max_rows)
    if key in _PROBES:
        return _PROBES[key]
    generator = torch.Generator().manual_seed(1234)
    weight = (torch.randn(hidden_size, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    x = torch.randn(max_rows, hidden_size, generator=generator).to(device, dtype)
    result = ExactnessProbe(True)
    with torch.no_grad():
        for rows in sorted({2, 3, 8, 16, 25, max_rows} & set(range(2, max_rows + 1))):
            batch = F.linear(x[:rows], weight)
            for r in {0, rows // 2, rows - 1}:
                if not torch.equal(batch[r : r + 1], F.linear(x[r : r + 1], weight)):
                    result = ExactnessProbe(False, f"F.linear in {dtype} is not row-invariant ({rows} rows, row {r})")
                    break
            if not result.exact:
                break
        if result.exact:
            heads, head_dim, length = 4, 64, 300
            q = torch.randn(1, heads, 1, head_dim, generator=generator).to(device, dtype)
            big = torch.randn(1, heads, length + 16, head_dim, generator=generator).to(device, dtype)
            view = F.scaled_dot_product_attention(q, big[:, :, 3:length], big[:, :, 3:length])
            copy = big[:, :, 3:length].contiguous()
            if not torch.equal(view, F.scaled_dot_product_attention(q, copy, copy)):
                result = ExactnessProbe(False, f"SDPA in {dtype} depends on the key tensor's strides")
    _PROBES[key] = result
    return result


_SHAPE_PROBES: dict[tuple, ExactnessProbe] = {}


def probe_linear_shapes(
    device: torch.device | str, dtype: torch.dtype, shapes: list[tuple[int, int]], max_rows: int
) -> ExactnessProbe:
    """
    Checks, once per (device, dtype, shapes, max_rows), that `F.linear` with each `(in_features, out_features)` of
    `shapes` gives every row of an `M`-row call what a one-row call gives it, for EVERY `M` from 2 to `max_rows` and
    every row: GEMM kernels can change their blocking past some row count for some widths (e.g. bf16 on an AMX CPU,
    64 -> 37 features, from 89 rows on), which a few sampled sizes would miss. The batched exact verification
    (`generation/batched.py`) runs only where this holds for the target's own linear layers.
    """
    device = torch.device(device)
    shapes = sorted(set(shapes))
    key = (device.type, device.index, dtype, tuple(shapes), max_rows)
    if key in _SHAPE_PROBES:
        return _SHAPE_PROBES[key]
    generator = torch.Generator().manual_seed(4321)
    result = ExactnessProbe(True)
    with torch.no_grad():
        for in_features, out_features in shapes:
            weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device, dtype)
            x = torch.randn(max_rows, in_features, generator=generator).to(device, dtype)
            single = torch.cat([F.linear(x[r : r + 1], weight) for r in range(max_rows)])
            for rows in range(2, max_rows + 1):
                if not torch.equal(F.linear(x[:rows], weight), single[:rows]):
                    result = ExactnessProbe(False, f"F.linear {in_features}->{out_features} in {dtype} is not "
                                                   f"row-invariant at {rows} rows")
                    break
            if not result.exact:
                break
    _SHAPE_PROBES[key] = result
    return result
