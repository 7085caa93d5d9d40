"""The target's LM head during verification: which function maps final hidden states to logits, and how the
verification block's logits are computed (inside the forward, or lazily for the slots the acceptance walk reads).

On CPUs the verification forward computes only the root's logits (`logits_to_keep=[0]`); the other slots' logits come
from the final hidden states through the head ([`find_logits_head`]) when the walk reads them ([`SlotLogits`]):

* `"row"` (float32): one row per read slot, the arithmetic of plain decoding's one-row head. For greedy argmax reads
  ([`SlotLogits.argmax`] with an `error_scale`), the slot is computed together with its most probable descendants in
  one call (one pass over the head's weights instead of one per slot). A multi-row product may round differently
  from the one-row product, so a grouped row's argmax is used only when its top-1 / top-2 margin exceeds a proven
  bound on that difference: for a dot product of length `K` computed in any order, the error is at most
  `gamma_K * sum_k |w_k h_k| <= gamma_K * max_j ||W_j|| * ||h||` with `gamma_K = K u / (1 - K u)` and `u = 2^-24`;
  two computations differ by at most twice that per logit, so a margin above four times it (eight, for slack) cannot
  flip. Rows within the bound are recomputed alone, as plain decoding computes them.
* `"block"` (bf16/fp16): every non-root slot in one call at the first read.
* `"model"`: every slot's logits from the forward (accelerators, or no head reproduces the model's logits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .acceptance import greedy_token_ids

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .tree import DraftTree

#: Devices where verification computes LM-head logits lazily, only for the slots the acceptance walk reads (matrix
#: products cost about linearly in rows on a CPU; on accelerators one batched head product is cheaper).
LAZY_HEAD_DEVICES = ("cpu",)
#: Rows of one grouped head call in float32 greedy reads (the read slot and its most probable descendants).
GROUP_ROWS = 8
#: Fewer rows are padded to this many: one-row products and products of four or more rows use the fast kernels
#: (measured on a 2-core AVX-512 CPU, fp32 49,152 x 576 head: 1 row 6.8 ms, 2 rows 13.5 ms, 4 rows 9.5 ms).
MIN_GROUP_ROWS = 4
#: Safety factor over the proven bound (four times the per-logit error bound).
MARGIN_FACTOR = 8.0


def find_logits_head(
    target: "PreTrainedModel", final_hidden: torch.Tensor, logits: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """
    A function from final (normed) hidden states to the target's logits, checked against logits the model itself
    produced (the prefill's last position), or `None` when no candidate reproduces them (verification then computes
    every slot's logits inside the model, as on accelerators).

    Candidates: the output embeddings alone, then with `final_logit_softcapping` of the text config when it is set
    (Gemma 2 and Gemma 3 causal LMs apply it; Gemma 3's multimodal class, in transformers 5.23, does not). A wrong
    candidate differs by far more than the tolerance, which only absorbs rounding.

    Args:
        target (`PreTrainedModel`): the target.
        final_hidden (`torch.FloatTensor` of shape `(1, 1, hidden)`): final hidden state of one position.
        logits (`torch.FloatTensor` of shape `(1, vocab)`): the model's logits at that position.
    """
    lm_head = target.get_output_embeddings()
    candidates: list[Callable[[torch.Tensor], torch.Tensor]] = [lm_head]
    cap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        candidates.append(lambda hidden: torch.tanh(lm_head(hidden) / cap) * cap)
    reference = logits.float().reshape(-1)
    for candidate in candidates:
        produced = candidate(final_hidden).float().reshape(-1)
        if produced.shape == reference.shape and torch.allclose(produced, reference, rtol=1e-2, atol=1e-2):
            return candidate
    return None


#: How verification logits are computed from the final hidden states (see [`SlotLogits`]).
HEAD_MODES = ("model", "row", "block")


def head_mode_for(head: Callable | None, dtype: torch.dtype) -> str:
    """
    `"model"` where the lazily applied head is unavailable (every slot's logits come from the forward), else `"row"`
    in float32 (each walked slot through a one-row head call, the arithmetic of plain decoding's one-row head: fp32
    GEMMs are not row-invariant on CPUs; greedy reads group rows under a margin check, see the module docstring) and
    `"block"` in reduced precision (all slots in one call at the first read: on CPUs with bf16 matrix units the head
    costs the same for 1 and 25 rows, and bf16 GEMMs are row-invariant, which the exactness probe checks).
    """
    if head is None:
        return "model"
    return "row" if dtype == torch.float32 else "block"


def _full_precision_float32_matmul() -> bool:
    """Whether CPU float32 matrix products run in float32 (not allowed to use bf16/TF32 internally)."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(matmul, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # legacy and new precision APIs mixed: do not guess
        return False


def grouped_argmax_error_scale(head: Callable | None) -> float | None:
    """
    `MARGIN_FACTOR * gamma_K * max_j ||W_j||` of a plain float32 linear head (no bias), the per-unit-`||h||` margin
    above which a grouped row's argmax equals the one-row product's (module docstring); `None` where the bound does
    not apply (another head, e.g. with soft-capping; another dtype; float32 matmuls allowed to use reduced precision),
    and greedy reads then compute one row per slot.
    """
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        return None
    if not _full_precision_float32_matmul():
        return None
    unit = 2.0**-24
    k = head.in_features
    gamma = k * unit / (1 - k * unit)
    with torch.no_grad():
        norm = float(torch.linalg.vector_norm(head.weight, dim=1).max())
    return MARGIN_FACTOR * gamma * norm * (1 + 1e-3)  # the norm itself is rounded


def likely_descendants(tree: "DraftTree", slot: int, limit: int) -> list[int]:
    """`slot` followed by up to `limit - 1` of its descendants, most probable first (cumulative draft score)."""
    below = torch.nonzero(tree.ancestors[:, slot], as_tuple=False).flatten()
    below = below[below != slot]
    if below.numel() == 0 or limit <= 1:
        return [slot]
    order = torch.argsort(tree.scores[below - 1], descending=True, stable=True)[: limit - 1]
    return [slot] + below[order].tolist()


class SlotLogits:
    """
    Verification logits of the block's slots (root + tree nodes), float32, `(1, vocab)` per slot.

    Modes (see [`head_mode_for`]): `"model"`: the target's forward computed every slot. `"row"` / `"block"` (CPU): the
    forward computed only the root's logits (`logits_to_keep=[0]`) and the others come from the final hidden states
    through `head` (see [`find_logits_head`], which checks that it reproduces the model's own logits), one row per
    slot the walk reads, or every slot in one call at the first read. `seconds` is the time spent in `head`.

    Args:
        logits (`torch.FloatTensor` of shape `(n_slots, vocab)` or `(1, vocab)`): the forward's logits.
        final_hidden (`torch.FloatTensor` of shape `(n_slots, hidden)`): final hidden states of every slot.
        head (`Callable`, *optional*): hidden states to logits (`None` in `"model"` mode).
        mode (`str`): one of [`HEAD_MODES`].
        tree (`DraftTree`, *optional*): the verified tree; with `error_scale`, `"row"`-mode argmax reads group a slot
            with its likely descendants.
        error_scale (`float`, *optional*): [`grouped_argmax_error_scale`] of `head`.
    """

    def __init__(self, logits: torch.Tensor, final_hidden: torch.Tensor, head: Callable | None, mode: str,
                 tree: "DraftTree | None" = None, error_scale: float | None = None):
        if mode not in HEAD_MODES:
            raise ValueError(f"head mode {mode!r} is not one of {HEAD_MODES}")
        self.mode, self.head, self.final_hidden = mode, head, final_hidden
        self.rows: dict[int, torch.Tensor] = {0: logits[:1].float()} if mode != "model" else {}
        self.all = logits.float() if mode == "model" else None
        self.block: torch.Tensor | None = None  # block mode: the non-root slots' logits, once computed
        self.argmaxes: list[int] | None = None  # model mode: every slot's; block mode: the non-root slots'
        self.tree = tree if mode == "row" and error_scale is not None else None
        self.error_scale = error_scale
        self.grouped: dict[int, int] = {}  # row mode: argmax of grouped slots, -1 where the margin check failed
        self.seconds = 0.0

    def _compute(self, slot: int) -> torch.Tensor:
        started = time.perf_counter()
        if self.mode == "row":
            row = self.rows[slot] = self.head(self.final_hidden[slot : slot + 1]).float()
        else:  # block: every non-root slot at once
            block = self.block = self.head(self.final_hidden[1:]).float()
            for i in range(block.shape[0]):
                self.rows[i + 1] = block[i : i + 1]
            row = self.rows[slot]
        self.seconds += time.perf_counter() - started
        return row

    def _group(self, slot: int) -> None:
        """Argmaxes of `slot` and its likely descendants from one head call, each kept only past the margin bound
        (nothing for a leaf, which the one-row product serves)."""
        group = likely_descendants(self.tree, slot, GROUP_ROWS)
        if len(group) == 1:
            return
        started = time.perf_counter()
        rows = group + [group[-1]] * max(MIN_GROUP_ROWS - len(group), 0)
        hidden = self.final_hidden[rows]
        top = self.head(hidden).float().topk(2, dim=-1)
        bound = self.error_scale * torch.linalg.vector_norm(hidden.float(), dim=-1)
        safe = (top.values[:, 0] - top.values[:, 1]) > bound
        picked = torch.where(safe, top.indices[:, 0], torch.full_like(top.indices[:, 0], -1)).tolist()  # one sync
        for s, token in zip(group, picked):
            self.grouped.setdefault(s, token)
        self.seconds += time.perf_counter() - started

    def __getitem__(self, slot: int) -> torch.Tensor:
        if self.mode == "model":
            return self.all[slot : slot + 1]
        row = self.rows.get(slot)
        return row if row is not None else self._compute(slot)

    def argmax(self, slot: int) -> int:
        if self.mode == "block" and slot:
            if self.argmaxes is None:
                if self.block is None:
                    self._compute(slot)
                self.argmaxes = greedy_token_ids(self.block).tolist()  # one host sync for every non-root slot
            return self.argmaxes[slot - 1]
        if self.tree is not None and slot and slot not in self.rows:
            if slot not in self.grouped:
                self._group(slot)
            token = self.grouped.get(slot, -1)
            if token >= 0:
                return token
            # a leaf (nothing to group with), or within rounding of a tie: the one-row product decides, as in plain
            # decoding
        if self.mode != "model":
            return int(greedy_token_ids(self[slot]).item())
        if self.argmaxes is None:
            self.argmaxes = greedy_token_ids(self.all).tolist()  # one host sync for every slot
        return self.argmaxes[slot]
