"""EAGLE-2 dynamic-tree drafting with a SpecVLM draft.

The drafter owns the draft's per-row state (its own KV cache over the accepted context, the next draft position, and
the draft's last predicted feature). One cycle:

0. `prefill(...)`: the first catch-up over the prompt; with a draft that has a visual compressor, the image spans of
   the prompt are compressed first, so the draft's cache holds fewer entries than there are prompt positions (every
   later call passes explicit logical positions, counted by `next_position`).
1. `extend(features, next_tokens)`: catch-up forward over the pairs `(f_t, x_{t+1})` committed since the last cycle
   (EAGLE's shift) -> the last output predicts the root's children.
2. `propose()`: expand the top-k children of every frontier node for `depth - 1` steps (K^2 candidates per step,
   frontier = best K by cumulative log-probability), rerank every recorded candidate and keep the best
   `total_tokens`; the scratch keys/values of the expansion are dropped from the draft cache afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from typing import TYPE_CHECKING

from ..models.compressor_metrics import choice_histogram
from .drafters import DrafterStats
from .tree import DraftTree, select_nodes

if TYPE_CHECKING:  # pragma: no cover
    from .adaptive import AdaptiveTreeSizer


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TreeKnobs:
    """Tree shape for one generate call (defaults come from the draft config; see `SpecVLMDraftConfig`)."""

    top_k: int
    depth: int
    total_tokens: int

    def __post_init__(self):
        for name in ("top_k", "depth", "total_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"tree_{name} must be >= 1, got {getattr(self, name)}")


class EagleTreeDrafter:
    """
    Drafts EAGLE-2 trees for one sequence (batch row).

    Args:
        draft (`SpecVLMDraftModel`): the draft.
        embed_tokens (`nn.Module`): the target's input embedding (`target.get_input_embeddings()`).
        lm_head (`nn.Module`): the target's LM head (`target.get_output_embeddings()`).
        knobs (`TreeKnobs`): tree shape (the upper bounds when `sizer` is given).
        sizer (`AdaptiveTreeSizer`, *optional*): chooses each tree's depth and node budget from measured costs.
    """

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module, knobs: TreeKnobs,
                 sizer: "AdaptiveTreeSizer | None" = None):
        self.draft = draft
        self.sizer = sizer  # adaptive tree size (adaptive.py); None: the knobs' fixed shape
        self.last_step_seconds: float | None = None  # mean draft expansion step of the last propose()
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.knobs = knobs
        self.cache = DynamicCache()
        self.next_position = 0  # draft position of the next pair (token index of its feature)
        self.last_hidden: torch.Tensor | None = None  # (1, hidden): predicted feature of the root
        self.stats = DrafterStats()
        param = next(draft.parameters())
        self.device, self.dtype = param.device, param.dtype

    # -------------------------------------------------------------------------------------------------------------
    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        head_dtype = self.lm_head.weight.dtype if self.draft.lm_head is None else self.dtype
        logits = self.draft.compute_logits(hidden.to(head_dtype), self.lm_head)
        return torch.log_softmax(logits.float(), dim=-1)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids.to(self.embed_tokens.weight.device)).to(self.device)

    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
        grid_sizes: list[tuple[int, int] | None] | None = None,
        start_position: int = 0,
    ) -> None:
        """
        First catch-up over the prompt.

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(1, L, hidden)`): the target's input embeddings of tokens
                `1..L` (prompt tokens 1..L-1, then the first generated token).
            features (`torch.FloatTensor` of shape `(1, L, feature_width)`): target features of tokens `0..L-1`.
            visual_mask (`torch.BoolTensor` of shape `(1, L)`, *optional*): positions whose paired token is a visual
                placeholder (never the last one, which pairs the first generated token). When the draft has a
                compressor and some position is visual, the draft sees the compressed sequence (the draft's
                `visual_mask` argument, gated by `features`, always with the compressor's inference behaviour) at its
                logical positions.
            grid_sizes (`list[tuple[int, int] | None]`, *optional*): per image span of the row, its `(rows, cols)`
                raster grid or `None` (compressed along the sequence).
            start_position (`int`, *optional*, defaults to 0): logical position of the first pair (its feature's
                token index in the unpadded row); non-zero when the target's cache already held a prefix that the
                draft never saw (a reused or pre-filled cache).
        """
        inputs_embeds, features = inputs_embeds.to(self.device), features.to(self.device)
        _synchronize(self.device)
        started = time.perf_counter()
        length = inputs_embeds.shape[1]
        call = {
            "inputs_embeds": inputs_embeds,
            "target_hidden_states": features,
            "position_ids": torch.arange(start_position, start_position + length, device=self.device)[None],
            "past_key_values": self.cache,
            "use_cache": True,
        }
        compressor = self.draft.compressor if visual_mask is not None and bool(visual_mask.any()) else None
        if compressor is None:
            out = self.draft(**call)
        else:
            if bool(visual_mask[0, -1]):
                raise ValueError("the last prefill position pairs the first generated token and cannot be visual")
            # inference behaviour (argmax gate, per-image seeded pruning) whatever mode the module is in
            training = compressor.training
            compressor.eval()
            try:
                out = self.draft(**call, visual_mask=visual_mask.to(self.device), grid_sizes=[grid_sizes])
            finally:
                compressor.train(training)
            self.stats.compressor_choices = choice_histogram(out.compressor_output.choice, compressor.config)
        self.stats.forwards += 1
        _synchronize(self.device)
        self.stats.prefill_seconds = time.perf_counter() - started
        self.stats.seconds += self.stats.prefill_seconds
        self.stats.prefill_tokens = self.cache.get_seq_length()
        self.next_position = start_position + length
        self.last_hidden = out.last_hidden_state[:, -1]

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """
        Catch-up over newly committed pairs `(f_t, x_{t+1})`.

        Args:
            features (`torch.FloatTensor` of shape `(1, k, feature_width)`): target features of the root and the
                accepted nodes.
            next_tokens (`torch.LongTensor` of shape `(k,)`): the tokens that follow each of them (accepted tokens
                then the bonus token).
        """
        started = time.perf_counter()
        k = next_tokens.numel()
        positions = torch.arange(self.next_position, self.next_position + k, device=self.device)[None]
        out = self.draft(
            inputs_embeds=self._embed(next_tokens.view(1, -1)),
            target_hidden_states=features.to(self.device),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.stats.forwards += 1
        _synchronize(self.device)
        self.stats.seconds += time.perf_counter() - started
        self.next_position += k
        self.last_hidden = out.last_hidden_state[:, -1]

    # -------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self) -> DraftTree:
        """Grows, reranks and returns one EAGLE-2 tree; the draft cache is left holding the committed context only."""
        if self.last_hidden is None:
            raise RuntimeError("call prefill() before propose()")
        top_k, depth, budget = self.knobs.top_k, self.knobs.depth, self.knobs.total_tokens
        if self.sizer is not None:
            depth = self.sizer.depth
        step_seconds = 0.0
        ctx_len = self.cache.get_seq_length()
        neg = torch.finfo(self.dtype).min
        device = self.device

        started = time.perf_counter()
        logp = self._logprobs(self.last_hidden)[0]  # (V',)
        self.stats.seconds += time.perf_counter() - started
        k0 = min(top_k, logp.numel())
        top = torch.topk(logp, k0)
        rec_tokens = [self.draft.draft_to_target(top.indices)]
        rec_scores = [top.values]
        rec_parents = [torch.full((k0,), -1, dtype=torch.long, device=device)]
        n_rec = k0
        frontier = torch.arange(k0, device=device)  # record indices of the frontier
        frontier_parents = rec_parents[0]
        frontier_scores = top.values
        frontier_feed = self.last_hidden.expand(k0, -1)  # feature fed with each frontier token (its parent's output)
        frontier_tokens = rec_tokens[0]
        # ancestry among the scratch (already fed) nodes, and each record's scratch row (-1: never fed)
        max_fed = top_k * max(depth - 1, 0)
        scratch_anc = torch.zeros((max_fed, max_fed), dtype=torch.bool, device=device)
        scratch_of = torch.full((k0 + (depth - 1) * top_k * top_k,), -1, dtype=torch.long, device=device)
        n_fed = 0

        for step in range(1, depth):
            n_front = frontier.numel()
            new = torch.arange(n_fed, n_fed + n_front, device=device)
            # a frontier node's ancestry row = its parent's row (the parent was fed one step earlier) plus itself
            if step > 1:
                scratch_anc[new, :n_fed] = scratch_anc[scratch_of[frontier_parents], :n_fed]
            scratch_anc[new, new] = True
            scratch_of[frontier] = new
            n_fed += n_front

            mask = torch.zeros((1, 1, n_front, ctx_len + n_fed), dtype=self.dtype, device=device)
            mask[0, 0, :, ctx_len:] = torch.where(scratch_anc[new, :n_fed], 0.0, neg)
            positions = torch.full((1, n_front), self.next_position + step - 1, dtype=torch.long, device=device)
            started = time.perf_counter()
            out = self.draft(
                inputs_embeds=self._embed(frontier_tokens.view(1, -1)),
                target_hidden_states=frontier_feed[None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state[0]  # (n_front, H)
            child_logp = self._logprobs(hidden)  # (n_front, V')
            _synchronize(device)
            step_seconds += time.perf_counter() - started
            self.stats.forwards += 1
            kc = min(top_k, child_logp.shape[-1])
            child = torch.topk(child_logp, kc, dim=-1)
            cand_scores = (frontier_scores[:, None] + child.values).flatten()  # (n_front * kc,)
            cand_tokens = self.draft.draft_to_target(child.indices).flatten()
            cand_parents = frontier.repeat_interleave(kc)
            rec_tokens.append(cand_tokens)
            rec_scores.append(cand_scores)
            rec_parents.append(cand_parents)
            if step == depth - 1:
                break
            best = torch.topk(cand_scores, min(top_k, cand_scores.numel())).indices
            frontier = n_rec + best
            frontier_parents = cand_parents[best]
            frontier_scores = cand_scores[best]
            frontier_tokens = cand_tokens[best]
            frontier_feed = hidden[best // kc]
            n_rec += cand_scores.numel()

        if n_fed:
            self.cache.crop(-n_fed)
        self.stats.seconds += step_seconds
        self.last_step_seconds = step_seconds / (depth - 1) if depth > 1 else None

        tokens = torch.cat(rec_tokens).cpu()
        scores = torch.cat(rec_scores).float().cpu()
        parents = torch.cat(rec_parents).cpu()
        if self.sizer is not None:
            budget = self.sizer.budget(scores)
        keep = select_nodes(scores, parents, budget)
        slot_of = torch.full((tokens.numel(),), -1, dtype=torch.long)
        slot_of[keep] = torch.arange(1, keep.numel() + 1)
        kept_parents = parents[keep]
        parent_slots = torch.where(kept_parents >= 0, slot_of[kept_parents.clamp(min=0)], torch.zeros_like(kept_parents))
        return DraftTree.from_parents(tokens[keep], parent_slots, scores[keep])
