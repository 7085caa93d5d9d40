# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Training SpecVLM drafts: online-logit distillation against a live target (`pip install specvlm-hf[train]`).

Names are imported lazily, so `import specvlm_hf.training` stays cheap until a class is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "OnlineDistillationConfig": "config",
    "OnlineDistillationTrainer": "trainer",
    "DistillationCollator": "data",
    "DistillationDataset": "data",
    "StreamingDistillationDataset": "streaming",
    "SKIP_REASONS": "data",
    "load_llava_records": "data",
    "parse_llava_record": "data",
    "build_draft_vocab": "vocab",
    "prune_draft_vocab": "vocab",
    "token_frequencies": "vocab",
    "regenerate_answers": "self_distill",
    "chain_acceptance_length": "losses",
    "masked_sum": "losses",
    "smooth_l1_feature_loss": "losses",
    "soft_cross_entropy": "losses",
    "top1_agreement": "losses",
}

__all__ = [
    "DistillationCollator",
    "DistillationDataset",
    "OnlineDistillationConfig",
    "OnlineDistillationTrainer",
    "SKIP_REASONS",
    "StreamingDistillationDataset",
    "build_draft_vocab",
    "chain_acceptance_length",
    "load_llava_records",
    "masked_sum",
    "parse_llava_record",
    "prune_draft_vocab",
    "regenerate_answers",
    "smooth_l1_feature_loss",
    "soft_cross_entropy",
    "token_frequencies",
    "top1_agreement",
]

if TYPE_CHECKING:  # pragma: no cover
    from .config import OnlineDistillationConfig
    from .data import SKIP_REASONS, DistillationCollator, DistillationDataset, load_llava_records, parse_llava_record
    from .losses import chain_acceptance_length, masked_sum, smooth_l1_feature_loss, soft_cross_entropy, top1_agreement
    from .self_distill import regenerate_answers
    from .streaming import StreamingDistillationDataset
    from .trainer import OnlineDistillationTrainer
    from .vocab import build_draft_vocab, prune_draft_vocab, token_frequencies


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
