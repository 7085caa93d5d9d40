"""specvlm-hf: lossless SpecVLM-style tree speculative decoding for vision-language models in transformers.

Importing the package registers the draft with the Auto classes and routes
`target.generate(..., assistant_model=<SpecVLM draft>)` through the tree-speculation loop; every other kind of
assistant model, prompt lookup and plain generation are left untouched.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._registration import register_auto_classes
from .generation.route import install_generate_route, is_specvlm_draft, uninstall_generate_route
from .generation.stats import SpeculationStats
from .models import ElasticCompressorConfig, ElasticVisualCompressor, SpecVLMDraftConfig, SpecVLMDraftModel

register_auto_classes()
install_generate_route()

# Training pieces import transformers' Trainer (and accelerate): load them only when asked for.
_LAZY = {
    "OnlineDistillationConfig": "specvlm_hf.training",
    "OnlineDistillationTrainer": "specvlm_hf.training",
    "build_draft_vocab": "specvlm_hf.training",
    "prune_draft_vocab": "specvlm_hf.training",
    "create_model_card": "specvlm_hf.hub",
    "push_draft_to_hub": "specvlm_hf.hub",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specvlm_hf' has no attribute {name!r}")

__all__ = [
    "__version__",
    "SpecVLMDraftConfig",
    "SpecVLMDraftModel",
    "ElasticCompressorConfig",
    "ElasticVisualCompressor",
    "SpeculationStats",
    "install_generate_route",
    "uninstall_generate_route",
    "is_specvlm_draft",
    *_LAZY,
]
