"""Draft trees: the `DraftTree` dataclass and pure builders (selection, ancestry, depths, positions, children).

Indexing convention used throughout the library: a tree has `n` draft nodes stored in *creation order* (every parent
before its children). The verification block that the target sees has `n + 1` slots: slot 0 is the **root** (the last
emitted token, not yet in the target's cache) and slot `i + 1` is draft node `i`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """
    One speculation tree, ready for verification.

    Args:
        tokens (`torch.LongTensor` of shape `(n,)`): target token ids of the draft nodes, parents before children.
        parents (`torch.LongTensor` of shape `(n,)`): verification slot of each node's parent (0 = root).
        depths (`torch.LongTensor` of shape `(n + 1,)`): depth of every verification slot (root = 0).
        ancestors (`torch.BoolTensor` of shape `(n + 1, n + 1)`): `ancestors[i, j]` is True when slot `j` is slot `i`
            or one of its ancestors; this is the tree part of the verification attention mask.
        scores (`torch.FloatTensor` of shape `(n,)`): cumulative draft log-probability of each node's path.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    ancestors: torch.Tensor
    scores: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """Draft nodes (root excluded)."""
        return int(self.tokens.numel())

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor | None = None) -> "DraftTree":
        """Builds a tree from node tokens and parent slots (0 = root, `i + 1` = node `i`; parents precede children)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        parents = torch.as_tensor(parents, dtype=torch.long).flatten()
        if tokens.shape != parents.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} differ in shape")
        slots = torch.arange(1, tokens.numel() + 1)
        if tokens.numel() and bool((parents >= slots).any() or (parents < 0).any()):
            raise ValueError("every node's parent must be the root (0) or an earlier node (slot < own slot)")
        full_parents = torch.cat([torch.tensor([-1]), parents])
        anc = ancestor_matrix(full_parents)
        if scores is None:
            scores = torch.zeros(tokens.numel())
        return cls(tokens=tokens, parents=parents, depths=anc.sum(-1) - 1, ancestors=anc, scores=scores)

    @classmethod
    def make_dummy(cls, n: int = 4) -> "DraftTree":
        """A chain of `n` nodes with tokens `0..n-1` (for tests and docs)."""
        return cls.from_parents(torch.arange(n), torch.arange(n))


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """
    Ancestor-or-self matrix of a tree.

    Args:
        parents (`torch.LongTensor` of shape `(m,)`): parent index of each slot, `-1` for the root; parents precede
            children.

    Returns:
        `torch.BoolTensor` of shape `(m, m)` with `out[i, j]` True iff `j` is `i` or an ancestor of `i`.
    """
    m = parents.numel()
    anc = torch.eye(m, dtype=torch.bool)
    parents = parents.to(torch.long)
    current = parents.clone()
    rows = torch.arange(m)
    # follow parent pointers level by level; at most depth iterations, each vectorised over all slots
    while bool((current >= 0).any()):
        valid = current >= 0
        anc[rows[valid], current[valid]] = True
        current = torch.where(valid, parents[current.clamp(min=0)], current)
    return anc


def select_nodes(scores: torch.Tensor, parents: torch.Tensor, budget: int) -> torch.Tensor:
    """
    EAGLE-2 reranking: keeps the `budget` best candidates by cumulative log-probability, closed under parents.

    Args:
        scores (`torch.FloatTensor` of shape `(c,)`): cumulative log-probability of each recorded candidate.
        parents (`torch.LongTensor` of shape `(c,)`): index of each candidate's parent candidate, `-1` for children of
            the root; parents precede children.
        budget (`int`): maximum number of nodes kept.

    Returns:
        `torch.LongTensor` of candidate indices in creation order. Because a child's score never exceeds its parent's,
        the top-`budget` set is normally closed under parents; ties are resolved by dropping orphaned candidates, so
        the result may hold fewer than `budget` nodes but is always a valid tree.
    """
    c = scores.numel()
    if c == 0:
        return torch.zeros(0, dtype=torch.long)
    k = min(budget, c)
    chosen = torch.zeros(c, dtype=torch.bool)
    chosen[torch.topk(scores, k, sorted=False).indices] = True
    # closure under parents, one vectorised pass per tree level: a node survives while all its ancestors are chosen
    keep = chosen.clone()
    has_parent = parents >= 0
    parent_index = parents.clamp(min=0)
    while True:
        updated = chosen & (~has_parent | keep[parent_index])
        if torch.equal(updated, keep):
            break
        keep = updated
    return torch.nonzero(keep, as_tuple=False).flatten()


def children_table(tree: DraftTree) -> list[dict[int, int]]:
    """For every verification slot, a map from child token id to the child's slot."""
    table: list[dict[int, int]] = [{} for _ in range(tree.num_nodes + 1)]
    for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        table[par].setdefault(tok, i + 1)
    return table


def position_ids_for_tree(depths: torch.Tensor, start: int, mrope_axes: int = 0) -> torch.Tensor:
    """
    Target position ids of the verification block.

    Args:
        depths (`torch.LongTensor` of shape `(n + 1,)`): slot depths (root = 0).
        start (`int`): position of the root (the position the next token would get in plain decoding).
        mrope_axes (`int`, *optional*, defaults to 0): 3 for Qwen2-VL/Qwen2.5-VL multimodal RoPE (every text token
            after the last image has equal t/h/w positions), 0 for plain RoPE.

    Returns:
        `torch.LongTensor` of shape `(1, n + 1)`, or `(mrope_axes, 1, n + 1)` for mRoPE.
    """
    pos = (depths + start).view(1, -1)
    return pos.unsqueeze(0).expand(mrope_axes, 1, -1) if mrope_axes else pos
