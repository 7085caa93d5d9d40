"""Pluggable drafters: the protocol the decoding loop drafts through, the default factory, and a replay diagnostic.

The loop never builds a drafter itself: it asks a [`DrafterFactory`] for one per batch row, with a [`DrafterContext`]
describing the row. The factory comes from `generate(..., tree_drafter=factory)` or, by default,
[`EagleDrafterFactory`] (the SpecVLM draft's EAGLE-2 tree, `drafter.EagleTreeDrafter`). A drafter is anything with
the three calls of [`TreeDrafter`] (in the spirit of transformers' `CandidateGenerator`):

1. `prefill(inputs_embeds, features, visual_mask, grid_sizes, start_position)`: first catch-up over the prompt;
2. `propose() -> DraftTree`: one speculation tree rooted at the last emitted token;
3. `extend(features, next_tokens)`: catch-up over the tokens the target just committed;

and a `stats` ([`DrafterStats`]) the loop reads for `out.speculation`.

`extend` is called after every verification cycle; `propose` only for the cycles whose tree includes the draft's
nodes: with adaptive trees the loop may verify some cycles without drafting (`adaptive.AdaptiveTreeSizer.should_draft`),
so a drafter must accept several `extend` calls in a row (it may defer its catch-up until the next `propose`, as the
EAGLE drafter does).

[`ReplayDrafter`] is a documented diagnostic: it proposes a known continuation (plain `generate`'s own output) as a
chain plus one decoy sibling per depth, i.e. a perfect draft in a real branching tree. It tells what the loop could
give on a machine with a perfect draft (`specvlm bench --methods oracle`), and tests use it for long acceptances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .tree import DraftTree

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .drafter import TreeKnobs


@dataclass
class DrafterStats:
    """
    What a drafter reports to the loop.

    Args:
        forwards (`int`): draft model forwards (prefill, catch-up, expansion steps).
        prefill_tokens (`int`): entries the prefill wrote to the draft's cache (fewer with a visual compressor).
        prefill_seconds (`float`): wall time of the prefill.
        seconds (`float`): wall time inside the draft's forwards and its LM head (prefill included).
        step_seconds (`float`): the part of `seconds` spent in tree expansion steps (a step: one draft forward over the
            frontier plus its LM head).
        steps (`int`): tree expansion steps taken (`step_seconds / steps` is the mean cost of one step).
        compressor_choices (`dict[str, int]`): primitive chosen by the draft's visual compressor, when it ran.
    """

    forwards: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    step_seconds: float = 0.0
    steps: int = 0
    compressor_choices: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class TreeDrafter(Protocol):
    """What the decoding loop drafts through (one instance per batch row)."""

    stats: DrafterStats

    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
        grid_sizes: list | None = None,
        start_position: int = 0,
    ) -> None:
        """First catch-up: embeddings of tokens `s+1..L` `(1, n, hidden)` and target features of `s..L-1`."""

    def propose(self) -> DraftTree:
        """One tree rooted at the last emitted token (see `tree.DraftTree` for the slot convention)."""

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Catch-up over committed pairs: features `(1, k, width)` of the root and accepted nodes, tokens `(k,)`; may
        be called several times between two `propose` calls."""


@dataclass(frozen=True)
class DrafterContext:
    """
    What a [`DrafterFactory`] knows about the row it drafts for.

    Args:
        draft (`SpecVLMDraftModel`): the assistant model of the call.
        embed_tokens (`nn.Module`) / lm_head (`nn.Module`): the target's input embedding and LM head.
        knobs (`TreeKnobs`): the call's tree shape.
        row (`int`): batch row.
        prompt_ids (`torch.LongTensor` of shape `(L,)`): the row's prompt without padding.
        vocab_size (`int`): the target's vocabulary size.
        sizer (`AdaptiveTreeSizer`, *optional*): the row's adaptive tree rule (`adaptive.py`), which the loop feeds
            with every cycle's measurements; `None` when the tree is fixed (`tree_adaptive=False`).
    """

    draft: Any
    embed_tokens: "nn.Module"
    lm_head: "nn.Module"
    knobs: "TreeKnobs"
    row: int
    prompt_ids: torch.Tensor
    vocab_size: int
    sizer: Any = None


class DrafterFactory(Protocol):
    """Builds the drafter of one batch row: `factory(context) -> TreeDrafter`."""

    def __call__(self, context: DrafterContext) -> TreeDrafter: ...


class EagleDrafterFactory:
    """The default: the SpecVLM draft's EAGLE-2 dynamic tree (`drafter.EagleTreeDrafter`)."""

    def __call__(self, context: DrafterContext) -> TreeDrafter:
        from .drafter import EagleTreeDrafter

        return EagleTreeDrafter(context.draft, context.embed_tokens, context.lm_head, context.knobs, context.sizer)


class ReplayDrafter:
    """
    Proposes the next `depth` tokens of a known continuation as a chain, with one decoy sibling at every depth (a token
    that is never the reference one), so that verification walks long paths through a real branching tree.

    Args:
        reference (`Sequence[int]`): the row's whole unpadded token sequence (prompt + continuation); token `i` is
            the one at logical position `i`.
        depth (`int`): chain length per cycle.
        vocab_size (`int`): the target's vocabulary (decoys are drawn inside it).
    """

    def __init__(self, reference: Sequence[int], depth: int, vocab_size: int):
        self.reference = [int(t) for t in reference]
        self.depth, self.vocab_size = int(depth), int(vocab_size)
        self.next_position = 0  # logical position of the root (the last emitted token)
        self.stats = DrafterStats()

    def prefill(self, inputs_embeds, features, visual_mask=None, grid_sizes=None, start_position: int = 0) -> None:
        self.next_position = start_position + inputs_embeds.shape[1]

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        self.next_position += int(next_tokens.numel())

    def propose(self) -> DraftTree:
        chain = self.reference[self.next_position + 1 : self.next_position + 1 + self.depth]
        if not chain:  # past the reference: one harmless guess
            chain = [self.reference[-1]]
        tokens, parents, prev = [], [], 0
        for token in chain:
            tokens += [token, (token + 1) % self.vocab_size]
            parents += [prev, prev]
            prev = len(tokens) - 1  # slot of the chain node just added (slots are 1-based, decoy is the last)
        return DraftTree.from_parents(torch.tensor(tokens), torch.tensor(parents))


class ReplayDrafterFactory:
    """
    `generate(..., assistant_model=draft, tree_drafter=ReplayDrafterFactory(references), tree_depth=d)`: every row
    replays its reference continuation with a [`ReplayDrafter`] of depth `tree_depth`.

    Args:
        references (`list[list[int]]`): per batch row, its unpadded prompt tokens followed by the continuation to
            replay (e.g. plain `generate`'s own output for the same call).
    """

    def __init__(self, references: Sequence[Sequence[int]]):
        self.references = [list(map(int, ref)) for ref in references]

    def __call__(self, context: DrafterContext) -> TreeDrafter:
        if context.row >= len(self.references):
            raise ValueError(f"ReplayDrafterFactory has {len(self.references)} references but row {context.row} asked")
        return ReplayDrafter(self.references[context.row], context.knobs.depth, context.vocab_size)


class FixedBlockDrafter:
    """
    Proposes the same chain of `num_nodes` copies of `token` every cycle, whatever was emitted: a verification forward
    of exactly `num_nodes + 1` query tokens per cycle through the loop's own path (prefill, masks, positions, exact
    attention, lazy LM head). A cost-measurement diagnostic: `bench.calibration` times verification with it.

    Args:
        num_nodes (`int`): chain length (0: the root alone).
        token (`int`): the chain's token id.
    """

    def __init__(self, num_nodes: int, token: int):
        self.tree = DraftTree.from_parents(torch.full((num_nodes,), int(token)), torch.arange(num_nodes))
        self.stats = DrafterStats()

    def prefill(self, inputs_embeds, features, visual_mask=None, grid_sizes=None, start_position: int = 0) -> None:
        pass

    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        pass

    def propose(self) -> DraftTree:
        return self.tree


class FixedBlockDrafterFactory:
    """
    `generate(..., assistant_model=draft, tree_drafter=FixedBlockDrafterFactory(n, token))`: every row verifies a chain
    of `n` nodes per cycle ([`FixedBlockDrafter`]).
    """

    def __init__(self, num_nodes: int, token: int):
        if num_nodes < 0:
            raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
        self.num_nodes, self.token = int(num_nodes), int(token)

    def __call__(self, context: DrafterContext) -> TreeDrafter:
        return FixedBlockDrafter(self.num_nodes, self.token)
