"""The n-gram branch: candidates copied from the context (prompt + generated text), merged into the draft's tree.

Prompt lookup (transformers' `prompt_lookup_num_tokens`) proposes, as a chain, the tokens that followed the most recent
earlier occurrence of the sequence's last `n` tokens. Here the same candidate becomes one more branch of the tree
(shared prefixes with the draft's nodes are merged), so one verification forward checks both and the walk takes
whichever the target agrees with. Deterministic candidates keep both acceptance rules lossless.

Knobs: `tree_ngram_tokens` (candidate length, 0 = off) and `tree_ngram_max` (longest suffix matched first), on the
draft config and per call (`generate(..., tree_ngram_tokens=0)`).
"""

from __future__ import annotations

import torch

from .tree import DraftTree

#: Score given to n-gram nodes that the draft did not propose (the adaptive rule predicts nothing from them).
NGRAM_SCORE = -30.0


def ngram_candidate(ids: torch.Tensor, num_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> torch.Tensor:
    """
    Tokens that followed the latest earlier occurrence of the longest suffix of `ids` (`max_ngram` down to
    `min_ngram` tokens) that occurs earlier, as prompt lookup finds them.

    Args:
        ids (`torch.LongTensor` of shape `(L,)`): the unpadded sequence so far; its last token is the tree's root.
        num_tokens (`int`): candidate length.

    Returns:
        `torch.LongTensor` of shape `(k,)`, `0 <= k <= num_tokens` (empty when nothing matches).
    """
    length = ids.numel()
    if num_tokens < 1 or length < 2:
        return ids.new_empty(0)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[-n:]
        windows = ids[: length - 1].unfold(0, n, 1)  # every window that ends before the last token
        hits = torch.nonzero((windows == suffix).all(dim=1), as_tuple=False).flatten()
        if hits.numel():
            start = int(hits[-1]) + n  # the latest occurrence: recent text predicts best
            return ids[start : start + num_tokens]
    return ids.new_empty(0)


def matched_prefix(candidate: list[int], emitted: list[int]) -> int:
    """How many leading tokens of `candidate` the cycle emitted (the walk took the branch that far)."""
    matched = 0
    for proposed, taken in zip(candidate, emitted):
        if proposed != taken:
            break
        matched += 1
    return matched


def merge_branch(tree: DraftTree, branch: torch.Tensor) -> DraftTree:
    """
    Adds `branch` (a chain below the root) to `tree`: follows existing children with the same tokens, then appends
    the rest as new nodes (after every existing node, so parents still precede children).

    Args:
        tree (`DraftTree`): the draft's tree.
        branch (`torch.LongTensor` of shape `(k,)`): candidate tokens following the root.
    """
    if branch.numel() == 0:
        return tree
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    slot, new_tokens, new_parents = 0, [], []
    children: dict[tuple[int, int], int] = {(p, t): i + 1 for i, (t, p) in enumerate(zip(tokens, parents))}
    for token in branch.tolist():
        child = children.get((slot, token))
        if child is None:
            new_tokens.append(token)
            new_parents.append(slot)
            child = len(tokens) + len(new_tokens)
            children[(slot, token)] = child
        slot = child
    if not new_tokens:
        return tree
    scores = torch.cat([tree.scores.float(), torch.full((len(new_tokens),), NGRAM_SCORE)])
    return DraftTree.from_parents(torch.tensor(tokens + new_tokens), torch.tensor(parents + new_parents), scores)
