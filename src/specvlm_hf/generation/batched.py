"""Batch > 1: every unfinished row's tree verified in ONE target forward per cycle.

After the shared batched prefill (`loop.py`), each cycle:

1. the drafter proposes one tree per unfinished row (the EAGLE draft batched too: one draft forward per expansion
   step and one catch-up forward for all rows, `drafter.BatchedEagleTreeDrafter`; other drafters row by row); with
   adaptive trees a cycle goes without the draft when no row's rule finds it worth its cost
   (`adaptive.AdaptiveTreeSizer.should_draft`), and the draft later catches up on every skipped cycle in one forward;
2. the rows' trees are padded to a common slot count `W` (padded slots attend only to themselves and are never
   walked) and verified in one forward of shape `(rows, W)` with per-row additive 4-D tree masks (left padding and
   each row's unused columns hidden, sliding windows applied per row) and per-row depth positions (3-axis mRoPE for
   Qwen2-VL / Qwen2.5-VL);
3. acceptance per row: greedy without logits processors walks every row's tree at once, one tensor step per depth
   (the LM head applied lazily to the rows still walking); otherwise each row walks its own tree with the logits
   processors on each node's own prefix, exactly as at batch size 1; stopping criteria are checked after every
   emitted token of every row;
4. per-row KV compaction; finished rows are dropped from the target cache and the drafter, so they stop costing.

Layout of the batched KV cache: **left-aligned rows with a per-row valid length**. Row `b` holds its left padding
and its own tokens in columns `0 .. lengths[b] - 1`, exactly where plain batched decoding holds them (column index =
index in the row's padded sequence); columns from `lengths[b]` to the tensor's width (the longest row) are unused and
masked. A cycle appends the padded block after the widest row, then row `b` copies its root and accepted nodes to
columns `lengths[b] ..` and the tensor is cut to the new longest row. Why this layout: nothing is ever shifted
but the accepted slots (the same copy as at batch size 1), the unused space of a row is exactly its length gap to the
longest row and is reused by its next accepted tokens (no holes accumulate, memory equals plain batched decoding's),
and every column keeps its plain-decoding index, so masks, sliding windows and positions are computed as at batch 1.
Sliding-window layers are kept whole (`cache_utils.unslide_layers`) and windowed by the mask, because trimming the
shared tensor to its last `window - 1` columns would cut keys that a shorter row still needs.

Exact verification (bf16/fp16, `exact_attention.py`) runs here too: its plan is built per row from the row's mask with
the unused columns cut out (the mask the row has at batch size 1), and each row's node paths are written right after
its valid columns (over its unused ones) and its block restored, so every row attends exactly what plain decoding
holds. Bitwise equality also needs the target's linear layers to be row-invariant up to the batched forward's row
count (`exact_attention.probe_linear_shapes` checks every row count; on the 2-core AVX512-BF16 CPU used here a
64 -> 37 bf16 GEMM stops being row-invariant at 89 rows): where they are for one row's block but not for the batch,
the rows are verified one after another (`loop._batched_route`).

What runs where (routed explicitly by `loop.py`, never silently): batch size 1, caches whose sliding-window layers
were trimmed by an earlier call, exact verification where only the batch's row count fails that probe, and
`tree_batched=False` go through the per-row loop; everything else at batch > 1 through this one. Greedy rows equal
their batch-1 result (bitwise with exact verification where the linear layers pass the probe; fp32 up to the
floating-point reordering of a multi-row forward, the same caveat as verification at batch 1, see the README);
sampled rows are distribution-exact.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .acceptance import greedy_token_ids, walk_tree
from .cache_utils import compact_rows, keep_rows
from .exact_attention import RowwisePlan
from .ngram import merge_branch, ngram_candidate
from .tree import DraftTree, children_table
from .verification import verify_forward

if TYPE_CHECKING:  # pragma: no cover
    from .loop import _RowDecoder


class PerRowDrafters:
    """
    The batched drafter interface over one drafter per row (`TreeDrafter`s of any kind: the replay diagnostic, a
    user's own). Each row drafts on its own; only verification is batched.

    Args:
        drafters (`list[TreeDrafter]`): prefilled drafters of the unfinished rows, in row order.
    """

    def __init__(self, drafters: list[Any]):
        self.rows = list(drafters)
        self.last_step_seconds: float | None = None

    def propose(self) -> list[DraftTree]:
        trees = [drafter.propose() for drafter in self.rows]
        steps = [getattr(drafter, "last_step_seconds", None) for drafter in self.rows]
        self.last_step_seconds = steps[0] if steps else None
        return trees

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        for i, (drafter, k) in enumerate(zip(self.rows, counts.tolist())):
            drafter.extend(features[i : i + 1, :k], next_tokens[i, :k])

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep.tolist()]


class BatchedTreeDecoder:
    """
    Decodes the unfinished rows of a batch together (see the module docstring). State lives here, per call.

    Args:
        target (`PreTrainedModel`): the target.
        draft (`SpecVLMDraftModel`): the draft (its `select_features` picks the tapped activations).
        cache (`DynamicCache`): the batched target cache after the prefill, sliding layers unslid.
        decoders (`list[_RowDecoder]`): per batch row, its decoder (logits processors, stopping criteria, stats,
            adaptive sizer, left padding and next position).
        drafter: the batched drafter of the rows in `rows` (`BatchedEagleTreeDrafter` or [`PerRowDrafters`]).
        rows (`list[int]`): batch rows still decoding after their first token, ascending.
        sequences (`torch.LongTensor` of shape `(batch, capacity)`): every row's ids so far (padding included) in a
            buffer that grows only when a row outruns it; `lengths[r]` tokens of row `r` are valid.
        lengths (`list[int]`): valid tokens per batch row in `sequences`.
        windows (`dict[str, int]`): sliding window per layer kind (`"sliding_attention"`), empty without one.
    """

    def __init__(self, target, draft, cache, decoders: list["_RowDecoder"], drafter, rows: list[int],
                 sequences: torch.Tensor, lengths: list[int], windows: dict[str, int]):
        self.target, self.draft, self.cache, self.decoders, self.drafter = target, draft, cache, decoders, drafter
        self.rows, self.sequences, self.lengths, self.windows = list(rows), sequences, list(lengths), windows
        first = decoders[rows[0]]
        self.layer_types = first.layer_types
        self.kinds = list(dict.fromkeys(self.layer_types)) if self.layer_types else ["full_attention"]
        self.mrope_axes, self.final_layer = first.mrope_axes, first.final_layer
        self.verify_layer_ids, self.head, self.head_mode = first.verify_layer_ids, first.head, first.head_mode
        self.root_only, self.no_draft = first.root_only, first.no_draft
        self.ngram_tokens, self.ngram_max = first.ngram_tokens, first.ngram_max
        self.device = target.get_output_embeddings().weight.device
        self.dtype = target.dtype
        self.fast_greedy = not first.do_sample and len(first.logits_processor) == 0 and not (
            first.keep_scores or first.keep_logits)
        self.simple_stops = first.simple_stops  # stopping.py: max-length / eos rules checked as tensors, or None
        self.exact, self.padded_batch = first.exact, first.padded_batch
        self.verify_forwards = 0
        self.verify_seconds = 0.0
        self.seconds_per_forward: list[float] = []
        device = self.device
        self.n_pad = torch.tensor([decoders[r].n_pad for r in rows], dtype=torch.long, device=device)
        self.next_position = torch.tensor([decoders[r].next_position for r in rows], dtype=torch.long, device=device)
        # columns each row holds in the cache: all of its ids but the root (the last one, verified next)
        self.columns = torch.tensor([lengths[r] - 1 for r in rows], dtype=torch.long, device=device)
        if len(rows) < len(decoders):  # rows that stopped at their first token leave the cache before any cycle
            keep_rows(cache, torch.tensor(rows, dtype=torch.long))

    # ------------------------------------------------------------------------------------------------------------
    def _pad_trees(self, trees: list[DraftTree]):
        """Every row's tree padded to `W` slots: tokens, parents (-1 = padded / root), depths, ancestors."""
        width = max(tree.num_nodes for tree in trees) + 1
        b = len(trees)
        tokens = torch.zeros((b, width), dtype=torch.long)
        parents = torch.full((b, width), -1, dtype=torch.long)
        depths = torch.zeros((b, width), dtype=torch.long)
        ancestors = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1)  # padded slots see themselves only
        for i, tree in enumerate(trees):
            n = tree.num_nodes + 1
            tokens[i, 1:n] = tree.tokens
            parents[i, 1:n] = tree.parents
            depths[i, :n] = tree.depths
            ancestors[i, :n, :n] = tree.ancestors
        d = self.device
        return width, tokens.to(d), parents.to(d), depths.to(d), ancestors.to(d)

    def _masks(self, width: int, depths: torch.Tensor, ancestors: torch.Tensor):
        """Additive `(b, 1, W, S + W)` mask per layer kind (a dict for hybrid models, as the stock forward takes)."""
        b = depths.shape[0]
        span = self.cache.get_seq_length()
        cols = torch.arange(span, device=self.device)
        prefix = (cols[None] >= self.n_pad[:, None]) & (cols[None] < self.columns[:, None])  # (b, S)
        prefix = prefix[:, None, :].expand(b, width, span)
        neg = torch.finfo(self.dtype).min
        masks = {}
        for kind in self.kinds:
            pre, tree = prefix, ancestors
            window = self.windows.get(kind)
            if window is not None:
                query_cols = self.columns[:, None] + depths  # (b, W): the column each slot takes on its path
                pre = pre & ((query_cols[:, :, None] - cols[None, None]) < window)
                tree = tree & ((depths[:, :, None] - depths[:, None, :]) < window)
            allowed = torch.cat([pre, tree], dim=-1)
            mask = torch.zeros((b, 1, width, span + width), dtype=self.dtype, device=self.device)
            masks[kind] = mask.masked_fill_(~allowed[:, None], neg)
        if len(masks) == 1 and (not self.layer_types or len(self.kinds) == 1):
            return next(iter(masks.values()))
        return masks

    def _exact_plan(self, mask, span: int, width: int) -> RowwisePlan:
        """
        The exact verification attention's plan (`exact_attention.py`): every row laid out as at batch size 1, its
        padding columns those a batch-1 cache would hold (a sliding layer's cache holds the last `window - 1`).
        """
        cols = torch.arange(span + width, device=self.device)
        pad = cols[None] < self.n_pad[:, None]  # (b, S + W)
        padding = {}
        for kind in self.kinds:
            window = self.windows.get(kind)
            kept = pad if window is None else pad & (cols[None] > self.columns[:, None] - window)
            padding[kind] = kept.cpu()
        if not isinstance(mask, dict):
            padding = {"full_attention": padding[self.kinds[0]]}
        return RowwisePlan.from_masks(mask, padding, self.padded_batch, valid=self.columns.tolist())

    def _greedy_walk(self, out, tokens: torch.Tensor, parents: torch.Tensor, width: int):
        """
        Greedy acceptance of every row at once, one tensor step per depth.

        Returns:
            `(path, emitted, n_emitted)`: `path` `(b, W + 1)` slots of the root and accepted nodes, `emitted`
            `(b, W)` tokens (accepted then bonus), `n_emitted` `(b,)`.
        """
        b = tokens.shape[0]
        device = self.device
        arange = torch.arange(b, device=device)
        final_hidden = out.hidden_states[self.final_layer]
        all_argmax = greedy_token_ids(out.logits) if self.head_mode == "model" else None  # (b, W)
        path = torch.zeros((b, width + 1), dtype=torch.long, device=device)
        emitted = torch.zeros((b, width), dtype=torch.long, device=device)
        n_emitted = torch.zeros(b, dtype=torch.long, device=device)
        current = torch.zeros(b, dtype=torch.long, device=device)
        alive = arange  # rows still walking
        head_seconds = 0.0
        for depth in range(width):
            if all_argmax is not None:
                choice = all_argmax[alive, current[alive]]
            elif depth == 0:
                choice = greedy_token_ids(out.logits[:, 0])
            else:
                started = time.perf_counter()
                choice = greedy_token_ids(self.head(final_hidden[alive, current[alive]][:, None]).float()[:, 0])
                head_seconds += time.perf_counter() - started
            emitted[alive, depth] = choice
            n_emitted[alive] += 1
            match = (parents[alive] == current[alive, None]) & (tokens[alive] == choice[:, None])  # (a, W)
            found = match.any(dim=-1)
            nxt = match.to(torch.int8).argmax(dim=-1)  # the first child carrying the token (children_table's rule)
            current[alive] = torch.where(found, nxt, current[alive])
            path[alive, depth + 1] = torch.where(found, nxt, path[alive, depth + 1])
            alive = alive[found]
            if alive.numel() == 0:  # one host sync per depth
                break
        return path, emitted, n_emitted, head_seconds

    def _first_stops(self, emitted: torch.Tensor, n_emitted: torch.Tensor) -> torch.Tensor:
        """Index of the first emitted token after which a max-length / eos criterion fires, per row (`W` = none)."""
        b, width = emitted.shape
        steps = torch.arange(width, device=emitted.device)
        fires = torch.zeros((b, width), dtype=torch.bool, device=emitted.device)
        max_length, eos = self.simple_stops.max_length, self.simple_stops.eos_ids
        if max_length is not None:
            lengths = torch.tensor([self.lengths[r] for r in self.rows], device=emitted.device)
            fires |= (lengths[:, None] + steps[None] + 1) >= max_length
        if eos is not None:
            fires |= torch.isin(emitted, eos.to(emitted.device))
        fires &= steps[None] < n_emitted[:, None]
        return torch.where(fires.any(dim=-1), fires.to(torch.int8).argmax(dim=-1), torch.full_like(n_emitted, width))

    def _write(self, row: int, new_tokens: list[int]) -> None:
        """Appends tokens to a row's ids (the buffer grows, once, if a row outruns it)."""
        start = self.lengths[row]
        end = start + len(new_tokens)
        if end > self.sequences.shape[1]:
            extra = self.sequences.new_zeros((self.sequences.shape[0], max(end - self.sequences.shape[1], 64)))
            self.sequences = torch.cat([self.sequences, extra], dim=1)
        self.sequences[row, start:end] = torch.tensor(new_tokens, dtype=self.sequences.dtype)
        self.lengths[row] = end

    def _walk_row(self, i: int, row: int, out, tree: DraftTree):
        """Acceptance of one row with logits processors / sampling / criteria of any kind (as at batch size 1)."""
        from .logits_head import SlotLogits

        decoder = self.decoders[row]
        logits = SlotLogits(out.logits[i], out.hidden_states[self.final_layer][i], self.head, self.head_mode)
        ids = self.sequences[row : row + 1, : self.lengths[row]]
        if self.fast_greedy:
            choose = lambda slot, emitted: logits.argmax(slot)  # noqa: E731
        else:
            def choose(slot: int, emitted: list[int]) -> int:
                prefix = torch.cat([ids, ids.new_tensor([emitted])], dim=-1) if emitted else ids
                return decoder._choose(prefix, logits[slot])

        def stop(emitted: list[int]) -> bool:
            return decoder._stops(torch.cat([ids, ids.new_tensor([emitted])], dim=-1))

        path, emitted, stopped = walk_tree(children_table(tree), choose, stop)
        return path, emitted, stopped, logits.seconds

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> None:
        """Decodes until every row has stopped; `sequences[r, :lengths[r]]` is then row `r`'s output."""
        while self.rows:
            cycle_started = time.perf_counter()
            candidates: list[torch.Tensor | None] = [None] * len(self.rows)
            if self.ngram_tokens:
                for i, row in enumerate(self.rows):
                    decoder = self.decoders[row]
                    context = self.sequences[row, decoder.n_pad : self.lengths[row]]
                    candidates[i] = ngram_candidate(context, self.ngram_tokens, self.ngram_max)
                    if decoder.sizer is not None:  # without the branch the sizer's candidate length stays 0
                        decoder.sizer.expect_ngram(candidates[i].numel())
            # adaptive trees: the batch drafts when any row's rule finds the draft worth its cost (a batched step
            # drafts every row for about the price of one); otherwise every row verifies its n-gram branch (or its
            # root alone) and the draft catches up later
            drafted = any(self.decoders[row].sizer is None or self.decoders[row].sizer.should_draft()
                          for row in self.rows)
            trees = self.drafter.propose() if drafted else [self.no_draft] * len(self.rows)
            draft_nodes = [tree.num_nodes for tree in trees]
            for i, candidate in enumerate(candidates):
                if candidate is not None:
                    trees[i] = merge_branch(trees[i], candidate)
            width, tokens, parents, depths, ancestors = self._pad_trees(trees)
            row_index = torch.tensor(self.rows, device=self.device)
            last = torch.tensor([self.lengths[r] - 1 for r in self.rows], device=self.sequences.device)
            tokens[:, 0] = self.sequences[row_index.to(self.sequences.device), last].to(self.device)
            mask = self._masks(width, depths, ancestors)
            positions = self.next_position[:, None] + depths
            if self.mrope_axes:
                positions = positions[None].expand(self.mrope_axes, -1, -1)
            span = self.cache.get_seq_length()
            out, verify_seconds = verify_forward(
                self.target, tokens, mask, positions, self.cache, self.verify_layer_ids,
                self.root_only if self.head_mode != "model" else 0,
                plan=self._exact_plan(mask, span, width) if self.exact else None,
            )
            self.verify_forwards += 1

            # ---- acceptance: per row (path, emitted, stopped)
            results: list[tuple[list[int], list[int], bool]] = []
            if self.fast_greedy and self.simple_stops is not None:
                path_t, emitted_t, n_emitted, head_seconds = self._greedy_walk(out, tokens, parents, width)
                stop_at = self._first_stops(emitted_t, n_emitted)
                host = torch.cat([path_t, emitted_t, n_emitted[:, None], stop_at[:, None]], dim=1).tolist()  # 1 sync
                for values in host:
                    n, first_stop = values[-2], values[-1]
                    k = min(n, first_stop + 1)
                    # root + the n - 1 accepted nodes; the emitted tokens cut right after a criterion fires
                    results.append((values[:n], values[width + 1 : width + 1 + k], first_stop < n))
            else:
                head_seconds = 0.0
                for i, row in enumerate(self.rows):
                    path, emitted, stopped, seconds = self._walk_row(i, row, out, trees[i])
                    head_seconds += seconds
                    results.append((path, emitted, stopped))
            verify_seconds += head_seconds
            self.verify_seconds += verify_seconds
            self.seconds_per_forward.append(verify_seconds)

            # ---- commit: ids, stats, compaction
            counts = [len(emitted) for _, emitted, _ in results]
            if self.simple_stops is not None and self.simple_stops.position_warners:
                self.simple_stops.warn_past_positions(max(self.lengths[r] for r in self.rows) + max(counts))
            k_max = max(counts)
            keep_slots = torch.zeros((len(self.rows), k_max), dtype=torch.long)
            next_tokens = torch.zeros((len(self.rows), k_max), dtype=torch.long)
            finished = []
            for i, (row, (path, emitted, stopped)) in enumerate(zip(self.rows, results)):
                k = len(emitted)
                self._write(row, emitted)
                slots = path[:k]
                keep_slots[i, :k] = torch.tensor(slots)
                keep_slots[i, k:] = slots[-1]
                next_tokens[i, :k] = torch.tensor(emitted)
                self.decoders[row].stats.record_cycle(len(path) - 1, k, trees[i].num_nodes)
                if not drafted:
                    self.decoders[row].stats.undrafted_cycles += 1
                if stopped:
                    finished.append(i)
            counts_t = torch.tensor(counts, device=self.device)
            keep_slots = keep_slots.to(self.device)
            index = torch.minimum(torch.arange(k_max, device=self.device)[None], counts_t[:, None] - 1)
            new_columns = self.columns + counts_t
            compact_rows(self.cache, self.columns[:, None] + index, span + keep_slots, int(new_columns.max()))
            self.columns = new_columns
            self.next_position = self.next_position + counts_t
            features = self.draft.select_features(out.hidden_states)  # (b, W, F)
            features = features[torch.arange(len(self.rows), device=self.device)[:, None], keep_slots]
            del out

            if finished:
                alive = [i for i in range(len(self.rows)) if i not in set(finished)]
                if not alive:
                    self.rows = []
                    break
                keep = torch.tensor(alive, dtype=torch.long)
                keep_rows(self.cache, keep, int(self.columns[keep.to(self.device)].max()))
                self.drafter.keep_rows(keep)
                keep_d = keep.to(self.device)
                self.columns, self.n_pad = self.columns[keep_d], self.n_pad[keep_d]
                self.next_position, counts_t = self.next_position[keep_d], counts_t[keep_d]
                features, next_tokens = features[keep_d], next_tokens[keep]
                results = [results[i] for i in alive]
                trees = [trees[i] for i in alive]
                draft_nodes = [draft_nodes[i] for i in alive]
                candidates = [candidates[i] for i in alive]
                self.rows = [self.rows[i] for i in alive]
            self.drafter.extend(features, next_tokens.to(self.device), counts_t)
            for i, row in enumerate(self.rows):
                decoder = self.decoders[row]
                if decoder.sizer is not None:
                    decoder.drafter = self.drafter
                    decoder._observe(trees[i], results[i][0], verify_seconds, cycle_started, candidates[i],
                                     results[i][1], draft_nodes=draft_nodes[i], drafted=drafted)
