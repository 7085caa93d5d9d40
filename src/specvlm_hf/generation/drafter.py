"""EAGLE-2 dynamic-tree drafting with a SpecVLM draft.

The drafter owns the draft's per-row state (its own KV cache over the accepted context, the next draft position, and
the draft's last predicted feature). One cycle:

0. `prefill(...)`: the first catch-up over the prompt; with a draft that has a visual compressor, the image spans of
   the prompt are compressed first, so the draft's cache holds fewer entries than there are prompt positions (every
   later call passes explicit logical positions, counted by `next_position`).
1. `extend(features, next_tokens)`: records the pairs `(f_t, x_{t+1})` committed by a cycle (EAGLE's shift); the
   catch-up forward over every pair recorded since the last tree runs at the start of the next `propose()` (one
   forward however many cycles the loop verified without drafting) -> its last output predicts the root's children.
2. `propose()`: expand the top-k children of every frontier node for `depth - 1` steps (K^2 candidates per step,
   frontier = best K by cumulative log-probability), rerank every recorded candidate and keep the best
   `total_tokens`; the scratch keys/values of the expansion are dropped from the draft cache afterwards.

The draft's own work runs under `torch.inference_mode()` (about 10 % less per-operation overhead than `no_grad` for
its small forwards on a CPU). Only the draft's private state (its cache, its last feature) and the proposed trees are
made there; nothing of the target's, nothing returned to the caller of `generate`.
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
from .verification import synchronize

if TYPE_CHECKING:  # pragma: no cover
    from .adaptive import AdaptiveTreeSizer


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
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # committed pairs not caught up yet (`extend`)
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

    @torch.inference_mode()
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
        synchronize(self.device)
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
        synchronize(self.device)
        self.stats.prefill_seconds = time.perf_counter() - started
        self.stats.seconds += self.stats.prefill_seconds
        self.stats.prefill_tokens = self.cache.get_seq_length()
        self.next_position = start_position + length
        self.last_hidden = out.last_hidden_state[:, -1]

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """
        Records newly committed pairs `(f_t, x_{t+1})`; the draft catches up on them at the next [`propose`].

        Args:
            features (`torch.FloatTensor` of shape `(1, k, feature_width)`): target features of the root and the
                accepted nodes.
            next_tokens (`torch.LongTensor` of shape `(k,)`): the tokens that follow each of them (accepted tokens
                then the bonus token).
        """
        if features.shape[1] != next_tokens.numel():
            raise ValueError(f"extend: {features.shape[1]} features for {next_tokens.numel()} tokens")
        self.pending.append((features, next_tokens.reshape(-1)))

    @torch.inference_mode()
    def catch_up(self) -> None:
        """One draft forward over every pair recorded by [`extend`] since the last one (no-op when none is)."""
        if not self.pending:
            return
        started = time.perf_counter()
        if len(self.pending) == 1:
            features, next_tokens = self.pending[0]
        else:
            features = torch.cat([f.to(self.device) for f, _ in self.pending], dim=1)
            next_tokens = torch.cat([t.to(self.device) for _, t in self.pending])
        self.pending = []
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
        synchronize(self.device)
        self.stats.seconds += time.perf_counter() - started
        self.next_position += k
        self.last_hidden = out.last_hidden_state[:, -1]

    # -------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self) -> DraftTree:
        """Grows, reranks and returns one EAGLE-2 tree; the draft cache is left holding the committed context only."""
        if self.last_hidden is None:
            raise RuntimeError("call prefill() before propose()")
        self.catch_up()
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
            synchronize(device)
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
        self.stats.step_seconds += step_seconds
        self.stats.steps += max(depth - 1, 0)
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


class BatchedEagleTreeDrafter:
    """
    Drafts EAGLE-2 trees for every unfinished batch row at once: one draft forward per expansion step and one catch-up
    forward per cycle for all rows (`generation/batched.py`).

    Built from the rows' prefilled [`EagleTreeDrafter`]s ([`from_rows`]): their caches are stacked left-aligned, row
    `b` holding `lengths[b]` valid columns (the rest is hidden by the masks), exactly the target's batched layout.
    Every row's trees have the shape of its own knobs and adaptive rule; what the draft proposes never changes the
    output (verification decides), only how much is accepted.

    Args:
        rows (`list[EagleTreeDrafter]`): one prefilled drafter per batch row (same draft, knobs and device).
    """

    def __init__(self, rows: list[EagleTreeDrafter]):
        from .cache_utils import stack_row_caches

        for row in rows:
            row.catch_up()  # a row drafter hands over a cache with every committed pair in it
        first = rows[0]
        self.draft, self.embed_tokens, self.lm_head, self.knobs = first.draft, first.embed_tokens, first.lm_head, first.knobs
        self.device, self.dtype = first.device, first.dtype
        self.sizers = [row.sizer for row in rows]
        self.cache, lengths = stack_row_caches([row.cache for row in rows])
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)  # valid draft-cache columns per row
        self.next_position = torch.tensor([row.next_position for row in rows], dtype=torch.long, device=self.device)
        self.last_hidden = torch.cat([row.last_hidden for row in rows])  # (b, hidden)
        self.stats = DrafterStats(
            forwards=sum(row.stats.forwards for row in rows),
            prefill_tokens=sum(row.stats.prefill_tokens for row in rows),
            prefill_seconds=sum(row.stats.prefill_seconds for row in rows),
            seconds=sum(row.stats.seconds for row in rows),
            step_seconds=sum(row.stats.step_seconds for row in rows),
            steps=sum(row.stats.steps for row in rows),
        )
        for row in rows:  # the visual compressor's choices of every row's prefill
            for name, count in row.stats.compressor_choices.items():
                self.stats.compressor_choices[name] = self.stats.compressor_choices.get(name, 0) + count
        self.last_step_seconds: float | None = None
        # committed pairs not caught up yet (`extend`): per cycle, (features, next_tokens, counts) of every row
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    _logprobs = EagleTreeDrafter._logprobs
    _embed = EagleTreeDrafter._embed

    @torch.inference_mode()
    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keeps batch rows `keep` (`torch.LongTensor`, ascending); the others are finished."""
        from .cache_utils import keep_rows

        keep = keep.to(self.device)
        self.lengths, self.next_position = self.lengths[keep], self.next_position[keep]
        self.last_hidden = self.last_hidden[keep]
        self.sizers = [self.sizers[i] for i in keep.tolist()]
        self.pending = [(f[keep], t[keep], c[keep]) for f, t, c in self.pending]
        keep_rows(self.cache, keep, int(self.lengths.max()))

    def _prefix_mask(self, n_query: int) -> torch.Tensor:
        """`(b, 1, n_query, S)` additive mask of the cache's columns: row `b` sees its first `lengths[b]` columns."""
        width = self.cache.get_seq_length()
        visible = torch.arange(width, device=self.device)[None] < self.lengths[:, None]  # (b, S)
        neg = torch.finfo(self.dtype).min
        mask = torch.zeros((visible.shape[0], 1, n_query, width), dtype=self.dtype, device=self.device)
        return mask.masked_fill(~visible[:, None, None, :], neg)

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """
        Records each row's newly committed pairs; the draft catches up on them at the next [`propose`] (several
        cycles' pairs in one forward when cycles went without drafting).

        Args:
            features (`torch.FloatTensor` of shape `(b, k, feature_width)`): per row, features of the root and its
                accepted nodes, padded to `k`.
            next_tokens (`torch.LongTensor` of shape `(b, k)`): the tokens following each of them, padded to `k`.
            counts (`torch.LongTensor` of shape `(b,)`): committed pairs per row (`1 <= counts <= k`).
        """
        if features.shape[:2] != next_tokens.shape or counts.shape != next_tokens.shape[:1]:
            raise ValueError(f"extend: features {tuple(features.shape)}, next_tokens {tuple(next_tokens.shape)} and "
                             f"counts {tuple(counts.shape)} disagree")
        self.pending.append((features.to(self.device), next_tokens.to(self.device), counts.to(self.device)))

    def _pending_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every recorded cycle's pairs, per row in commit order, left-aligned and padded: `(features, tokens,
        counts)` as [`extend`] takes them."""
        if len(self.pending) == 1:
            return self.pending[0]
        features = torch.cat([f for f, _, _ in self.pending], dim=1)
        tokens = torch.cat([t for _, t, _ in self.pending], dim=1)
        valid = torch.cat([torch.arange(t.shape[1], device=self.device)[None] < c[:, None] for _, t, c in self.pending],
                          dim=1)  # (b, sum k)
        counts = valid.sum(dim=1)
        # each row's valid pairs first, in order (a stable sort of the validity flags); padding after them
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
        features = features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
        return features, tokens.gather(1, order), counts

    @torch.inference_mode()
    def catch_up(self) -> None:
        """One draft forward over every row's pairs recorded by [`extend`] since the last one (no-op when none)."""
        if not self.pending:
            return
        from .cache_utils import compact_rows

        started = time.perf_counter()
        features, next_tokens, counts = self._pending_pairs()
        self.pending = []
        b, k = next_tokens.shape
        width = self.cache.get_seq_length()
        neg = torch.finfo(self.dtype).min
        steps = torch.arange(k, device=self.device)
        causal = steps[None, :] <= steps[:, None]  # (k, k)
        block = torch.zeros((b, 1, k, k), dtype=self.dtype, device=self.device).masked_fill(~causal[None, None], neg)
        mask = torch.cat([self._prefix_mask(k), block], dim=-1)
        out = self.draft(
            inputs_embeds=self._embed(next_tokens),
            target_hidden_states=features,
            attention_mask=mask,
            position_ids=self.next_position[:, None] + steps[None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.stats.forwards += 1
        rows = torch.arange(b, device=self.device)
        self.last_hidden = out.last_hidden_state[rows, counts - 1]
        # row b's new columns sit at width .. width + counts[b] - 1: move them right after its valid ones
        index = torch.minimum(steps[None], counts[:, None] - 1)  # (b, k), padded entries repeat the last pair
        compact_rows(self.cache, self.lengths[:, None] + index, width + index, int((self.lengths + counts).max()))
        self.lengths = self.lengths + counts
        self.next_position = self.next_position + counts
        synchronize(self.device)
        self.stats.seconds += time.perf_counter() - started

    @torch.inference_mode()
    def propose(self) -> list[DraftTree]:
        """Grows one EAGLE-2 tree per row (batched expansion) and returns them in row order."""
        self.catch_up()
        top_k, max_depth, budget = self.knobs.top_k, self.knobs.depth, self.knobs.total_tokens
        depths = [sizer.depth if sizer is not None else max_depth for sizer in self.sizers]
        depth = max(depths)
        b = self.last_hidden.shape[0]
        device, neg = self.device, torch.finfo(self.dtype).min
        rows = torch.arange(b, device=device)[:, None]

        started = time.perf_counter()
        logp = self._logprobs(self.last_hidden)  # (b, V')
        self.stats.seconds += time.perf_counter() - started
        k0 = min(top_k, logp.shape[-1])
        top = torch.topk(logp, k0, dim=-1)
        rec_tokens = [self.draft.draft_to_target(top.indices)]
        rec_scores = [top.values]
        rec_parents = [torch.full((b, k0), -1, dtype=torch.long, device=device)]
        step_ends = [k0]  # records per row after each step
        n_rec = k0
        frontier = torch.arange(k0, device=device)[None].expand(b, -1)
        frontier_parents = rec_parents[0]
        frontier_scores = top.values
        frontier_feed = self.last_hidden[:, None].expand(-1, k0, -1)
        frontier_tokens = rec_tokens[0]
        max_fed = top_k * max(depth - 1, 0)
        scratch_anc = torch.zeros((b, max_fed, max_fed), dtype=torch.bool, device=device)
        scratch_of = torch.full((b, k0 + (depth - 1) * top_k * top_k), -1, dtype=torch.long, device=device)
        prefix = self._prefix_mask(top_k) if depth > 1 else None
        n_fed = 0
        step_seconds = 0.0
        for step in range(1, depth):
            n_front = frontier.shape[1]
            new = torch.arange(n_fed, n_fed + n_front, device=device)
            if step > 1:
                scratch_anc[:, new, :n_fed] = scratch_anc[rows, scratch_of[rows, frontier_parents], :n_fed]
            scratch_anc[:, new, new] = True
            scratch_of[rows, frontier] = new[None]
            n_fed += n_front
            allowed = scratch_anc[:, new, :n_fed]  # (b, n_front, n_fed)
            tree_part = torch.zeros((b, 1, n_front, n_fed), dtype=self.dtype, device=device)
            tree_part.masked_fill_(~allowed[:, None], neg)
            mask = torch.cat([prefix[:, :, :n_front], tree_part], dim=-1)
            positions = (self.next_position + step - 1)[:, None].expand(-1, n_front)
            started = time.perf_counter()
            out = self.draft(
                inputs_embeds=self._embed(frontier_tokens),
                target_hidden_states=frontier_feed,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state  # (b, n_front, H)
            child_logp = self._logprobs(hidden)  # (b, n_front, V')
            synchronize(device)
            step_seconds += time.perf_counter() - started
            self.stats.forwards += 1
            kc = min(top_k, child_logp.shape[-1])
            child = torch.topk(child_logp, kc, dim=-1)
            cand_scores = (frontier_scores[:, :, None] + child.values).flatten(1)  # (b, n_front * kc)
            cand_tokens = self.draft.draft_to_target(child.indices).flatten(1)
            cand_parents = frontier.repeat_interleave(kc, dim=1)
            rec_tokens.append(cand_tokens)
            rec_scores.append(cand_scores)
            rec_parents.append(cand_parents)
            step_ends.append(step_ends[-1] + cand_scores.shape[1])
            if step == depth - 1:
                break
            best = torch.topk(cand_scores, min(top_k, cand_scores.shape[1]), dim=-1).indices  # (b, K)
            frontier = n_rec + best
            frontier_parents = cand_parents.gather(1, best)
            frontier_scores = cand_scores.gather(1, best)
            frontier_tokens = cand_tokens.gather(1, best)
            frontier_feed = hidden[rows, best // kc]
            n_rec += cand_scores.shape[1]

        if n_fed:
            self.cache.crop(-n_fed)
        self.stats.seconds += step_seconds
        self.stats.step_seconds += step_seconds
        self.stats.steps += max(depth - 1, 0)
        self.last_step_seconds = step_seconds / (depth - 1) if depth > 1 else None

        tokens = torch.cat(rec_tokens, dim=1).cpu()  # one transfer for every row
        scores = torch.cat(rec_scores, dim=1).float().cpu()
        parents = torch.cat(rec_parents, dim=1).cpu()
        trees = []
        for r in range(b):
            n = step_ends[depths[r] - 1]
            row_tokens, row_scores, row_parents = tokens[r, :n], scores[r, :n], parents[r, :n]
            row_budget = self.sizers[r].budget(row_scores) if self.sizers[r] is not None else budget
            keep = select_nodes(row_scores, row_parents, row_budget)
            slot_of = torch.full((n,), -1, dtype=torch.long)
            slot_of[keep] = torch.arange(1, keep.numel() + 1)
            kept_parents = row_parents[keep]
            parent_slots = torch.where(kept_parents >= 0, slot_of[kept_parents.clamp(min=0)],
                                       torch.zeros_like(kept_parents))
            trees.append(DraftTree.from_parents(row_tokens[keep], parent_slots, row_scores[keep]))
        return trees
