"""A test-only drafter that proposes the target's own continuation (long acceptances) plus decoy siblings."""

from __future__ import annotations

import torch

from specvlm_hf.generation import loop
from specvlm_hf.generation.drafter import EagleTreeDrafter
from specvlm_hf.generation.tree import DraftTree


class OracleDrafter(EagleTreeDrafter):
    """
    Proposes, for the row being decoded, the next `depth` tokens of a reference output as a chain, with one decoy
    sibling at every depth, so acceptance walks long paths through a real branching tree.

    `references` holds each row's unpadded reference token list; rows are assigned in creation order.
    """

    references: list[list[int]] = []
    created = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.row = OracleDrafter.created % len(OracleDrafter.references)
        OracleDrafter.created += 1

    @torch.no_grad()
    def propose(self) -> DraftTree:
        ref = OracleDrafter.references[self.row]
        root_index = self.next_position  # the root is token `next_position` of the unpadded row
        chain = ref[root_index + 1 : root_index + 1 + self.knobs.depth] or [3]
        tokens, parents = [], []
        prev_slot = 0
        for tok in chain:
            tokens.append(tok)
            parents.append(prev_slot)
            chain_slot = len(tokens)
            tokens.append((tok + 1) % 90 + 3)  # decoy sibling, never the reference token
            parents.append(prev_slot)
            prev_slot = chain_slot
        return DraftTree.from_parents(torch.tensor(tokens), torch.tensor(parents))


def use_oracle(monkeypatch, references: list[list[int]]) -> None:
    """Routes the loop's drafting through `OracleDrafter` for the given per-row references."""
    OracleDrafter.references = references
    OracleDrafter.created = 0
    monkeypatch.setattr(loop, "EagleTreeDrafter", OracleDrafter)
