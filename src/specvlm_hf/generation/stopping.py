"""Stopping checks over a cycle's accepted tokens at once, for the criteria that allow it.

Plain decoding calls every stopping criterion after every token. A verification cycle emits several tokens, so the
loops call the criteria after each emitted token of the walk (`acceptance.walk_tree`'s `stop`), which any criterion
supports. When the criteria are only transformers' own `MaxLengthCriteria` / `EosTokenCriteria` (what `generate`
builds from `max_new_tokens` / `max_length` and the end-of-sequence ids), the first token after which one fires is
found from the emitted tokens directly ([`first_stop`]); the result is the same, without a criteria call (and a
sequence copy) per token. `MaxLengthCriteria`'s one side effect, its warning once a sequence outgrows the model's
positions, is reproduced by [`warn_past_positions`].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria


@dataclass(frozen=True)
class SimpleStops:
    """
    The max-length / end-of-sequence rules of a criteria list.

    Args:
        max_length (`int`, *optional*): a sequence of this length (padding and prompt included) is finished.
        eos_ids (`torch.LongTensor`, *optional*): a sequence whose last token is one of these is finished.
        position_warners (`tuple`): the `MaxLengthCriteria` that warn past the model's positions.
    """

    max_length: int | None
    eos_ids: torch.Tensor | None
    position_warners: tuple = ()
    eos_set: frozenset = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "eos_set", frozenset(self.eos_ids.tolist()) if self.eos_ids is not None else frozenset())

    def first_stop(self, emitted: Sequence[int], length: int) -> int | None:
        """
        Index of the first of `emitted` after which a rule fires, for a sequence of `length` tokens before them;
        `None` when none does.
        """
        for i, token in enumerate(emitted):
            if (self.max_length is not None and length + i + 1 >= self.max_length) or token in self.eos_set:
                return i
        return None

    def warn_past_positions(self, longest: int) -> None:
        """`MaxLengthCriteria`'s own warning once a sequence of `longest` tokens reaches the model's positions (the
        criterion decides, as when it is called after a token)."""
        for criterion in self.position_warners:
            if longest >= criterion.max_position_embeddings:
                criterion(torch.zeros((1, longest), dtype=torch.long), None)


def simple_stops(criteria) -> SimpleStops | None:
    """
    The rules of `criteria` (a `StoppingCriteriaList`) when it holds only `MaxLengthCriteria` and `EosTokenCriteria`
    (exact types: a subclass may change the rule), else `None` (call every criterion after every token).
    """
    max_length, eos, warners = None, [], []
    for criterion in criteria:
        if type(criterion) is MaxLengthCriteria:
            max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
            if criterion.max_position_embeddings is not None:
                warners.append(criterion)
        elif type(criterion) is EosTokenCriteria:
            eos.append(criterion.eos_token_id.flatten())
        else:
            return None
    return SimpleStops(max_length, torch.cat(eos) if eos else None, tuple(warners))
