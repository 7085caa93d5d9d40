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
from .models import SpecVLMDraftConfig, SpecVLMDraftModel

register_auto_classes()
install_generate_route()

__all__ = [
    "__version__",
    "SpecVLMDraftConfig",
    "SpecVLMDraftModel",
    "SpeculationStats",
    "install_generate_route",
    "uninstall_generate_route",
    "is_specvlm_draft",
]
