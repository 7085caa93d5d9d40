# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Reduced draft vocabularies (EAGLE-3): the draft scores only the most frequent target tokens of the training data.

A reduced head makes every draft step cheaper (on CPU the full-vocabulary head costs as much as a large part of a
target decode step) and cannot break losslessness: the target still verifies every token; a token outside the draft
vocabulary can only come from the target's bonus.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX, DistillationDataset

logger = logging.getLogger(__name__)

__all__ = ["build_draft_vocab", "prune_draft_vocab", "token_frequencies"]


def token_frequencies(
    source: DistillationDataset | Mapping[int, int] | torch.Tensor | Iterable[Any], vocab_size: int
) -> torch.Tensor:
    r"""
    Frequencies of the tokens a draft is trained to predict.

    Args:
        source: a [`DistillationDataset`] (its `label_token_counts`, collected during validation), a mapping
            `token id -> count`, a `(vocab_size,)` tensor of counts, or an iterable of examples with `labels` (counted
            where `!= -100`, from position 2 on, i.e. the draft's targets).
        vocab_size (`int`): size of the target vocabulary.

    Returns:
        `torch.FloatTensor` of shape `(vocab_size,)`.
    """
    if isinstance(source, DistillationDataset):
        source = source.label_token_counts
    if isinstance(source, torch.Tensor):
        if source.shape != (vocab_size,):
            raise ValueError(f"a count tensor must have shape ({vocab_size},), got {tuple(source.shape)}")
        return source.double()
    if not isinstance(source, Mapping):
        counts: Counter = Counter()
        for example in source:
            labels = torch.as_tensor(example["labels"]).flatten()[2:]
            counts.update(labels[labels != IGNORE_INDEX].tolist())
        source = counts
    frequencies = torch.zeros(vocab_size, dtype=torch.float64)
    for token_id, count in source.items():
        if not 0 <= int(token_id) < vocab_size:
            raise ValueError(f"token id {token_id} is outside the target vocabulary [0, {vocab_size})")
        frequencies[int(token_id)] += count
    return frequencies


def build_draft_vocab(
    draft: nn.Module,
    target: nn.Module,
    dataset_or_token_counts: DistillationDataset | Mapping[int, int] | torch.Tensor | Iterable[Any],
    size: int,
    *,
    always_include: Iterable[int] | None = None,
) -> torch.LongTensor:
    r"""
    Gives `draft` a reduced vocabulary of the `size` most frequent training targets (EAGLE-3), with a head initialised
    from the target's LM-head rows (`draft.set_draft_vocab`). Call it before training: the reduced head is trained
    with the draft.

    Ties are broken by the smaller token id; when the data has fewer than `size` distinct tokens the rest is filled
    with the smallest unused ids. `always_include` ids (default: the target's end-of-sequence ids, so the draft can
    propose the end of an answer) are kept whatever their frequency.

    Args:
        draft ([`SpecVLMDraftModel`]): the draft to modify in place.
        target ([`~transformers.PreTrainedModel`]): its target (LM head, generation config).
        dataset_or_token_counts: see [`token_frequencies`].
        size (`int`): draft vocabulary size, `1 <= size <= vocab_size`.
        always_include (`Iterable[int]`, *optional*): ids that must be in the vocabulary.

    Returns:
        `torch.LongTensor` of shape `(size,)`: the kept target ids, sorted (the draft's `d2t`).
    """
    vocab_size = draft.config.vocab_size
    frequencies = token_frequencies(dataset_or_token_counts, vocab_size)
    token_ids = _most_frequent(frequencies, torch.arange(vocab_size), size, _always_included(target, always_include))
    draft.set_draft_vocab(token_ids, target.get_output_embeddings().weight)
    _log_coverage(frequencies, token_ids, vocab_size)
    return token_ids


def prune_draft_vocab(
    draft: nn.Module,
    target: nn.Module | None,
    dataset_or_token_counts: DistillationDataset | Mapping[int, int] | torch.Tensor | Iterable[Any],
    size: int,
    *,
    always_include: Iterable[int] | None = None,
) -> torch.LongTensor:
    r"""
    Shrinks the reduced vocabulary of a trained draft to its `size` most frequent ids, keeping the draft's trained head
    rows (no retraining, unlike [`build_draft_vocab`]). On a CPU a draft step is bound by reading weights, the head
    being the largest of them: halving it makes each step cheaper, at the price of the tokens left out, which can then
    only come from the target's bonus token. Output is unchanged either way (the target verifies every token).

    Ranking, ties and `always_include` are as in [`build_draft_vocab`]; only ids already in the draft's vocabulary are
    candidates.

    Args:
        draft ([`SpecVLMDraftModel`]): a draft with a reduced vocabulary (`draft.d2t`), modified in place.
        target ([`~transformers.PreTrainedModel`], *optional*): its target, for the default `always_include` (its
            end-of-sequence ids); pass `always_include` instead when it is not loaded.
        dataset_or_token_counts: see [`token_frequencies`].
        size (`int`): new draft vocabulary size, at most the current one.
        always_include (`Iterable[int]`, *optional*): ids that must stay (they must be in the current vocabulary);
            default: the target's end-of-sequence ids that the draft's vocabulary holds.

    Returns:
        `torch.LongTensor` of shape `(size,)`: the kept target ids, sorted (the draft's new `d2t`).
    """
    if getattr(draft, "d2t", None) is None or getattr(draft, "lm_head", None) is None:
        raise ValueError("prune_draft_vocab needs a draft with its own reduced head (`draft.d2t`); a draft that scores "
                         "the full vocabulary with the target's head gets one with `build_draft_vocab`.")
    current = draft.d2t.detach().cpu()
    vocab_size = draft.config.vocab_size
    frequencies = token_frequencies(dataset_or_token_counts, vocab_size)
    keep = _always_included(target, always_include)
    outside = sorted(set(keep) - set(current.tolist()))
    if outside and always_include is not None:
        raise ValueError(f"always_include ids {outside[:5]} are not in the draft's vocabulary")
    keep = [token_id for token_id in keep if token_id not in outside]  # default: the target's eos ids it has
    token_ids = _most_frequent(frequencies, current, size, keep)
    draft.shrink_draft_vocab(token_ids)
    _log_coverage(frequencies, token_ids, vocab_size)
    return token_ids


def _always_included(target: nn.Module | None, always_include: Iterable[int] | None) -> list[int]:
    """`always_include` as sorted unique ids; default: the target's end-of-sequence ids."""
    if always_include is None:
        eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        always_include = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return sorted({int(token_id) for token_id in always_include})


def _most_frequent(
    frequencies: torch.Tensor, candidates: torch.Tensor, size: int, always_include: list[int]
) -> torch.LongTensor:
    """The `size` most frequent of `candidates` (ties: smaller id first), `always_include` first; sorted ids."""
    if not 1 <= size <= candidates.numel():
        raise ValueError(f"size must be in [1, {candidates.numel()}], got {size}")
    if len(always_include) > size:
        raise ValueError(f"always_include has {len(always_include)} ids, more than size={size}")
    candidates = candidates.sort().values
    scores = frequencies[candidates].clone()
    scores[torch.isin(candidates, torch.tensor(always_include, dtype=torch.long))] = float("inf")
    order = torch.argsort(-scores, stable=True)  # stable: equal counts keep ascending ids
    return candidates[order[:size]].sort().values


def _log_coverage(frequencies: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> None:
    total = float(frequencies.sum())
    if total > 0:
        logger.info(
            "Draft vocabulary: %d of %d tokens covering %.2f%% of the training targets.",
            token_ids.numel(),
            vocab_size,
            100.0 * float(frequencies[token_ids].sum()) / total,
        )
