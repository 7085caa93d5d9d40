"""Perfect-draft runs for tests: the library's `ReplayDrafterFactory` (the target's own continuation as a chain plus a
decoy sibling per depth, so acceptance walks long paths through a real branching tree), passed through `generate`."""

from __future__ import annotations

from specvlm_hf.generation.drafters import ReplayDrafterFactory


def oracle(references: list[list[int]]) -> dict:
    """`generate` keyword arguments that replay `references` (per row: unpadded prompt + reference continuation)."""
    return {"tree_drafter": ReplayDrafterFactory(references)}
