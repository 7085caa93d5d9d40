"""Routes `target.generate(..., assistant_model=<SpecVLM draft>)` to the tree-speculation loop.

`generate()` looks up its decoding method on the *class* at call time (`getattr(type(self), "_assisted_decoding")`),
so the hook wraps `GenerationMixin._assisted_decoding` once at import. The wrapper hands over only when the assistant
carries the SpecVLM draft marker (checked by duck typing, because classes loaded through `trust_remote_code` are
distinct objects); every other assistant model, prompt lookup, early exit and MTP run the original method unchanged.
`uninstall_generate_route()` restores the original.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers.generation.utils import GenerationMixin

DRAFT_MARKER = "_is_specvlm_draft"
_ROUTE_FLAG = "_specvlm_route"


def is_specvlm_draft(model: Any) -> bool:
    """True when `model` is a SpecVLM draft (installed class or the same class loaded as remote code)."""
    return model is not None and bool(getattr(type(model), DRAFT_MARKER, False))


def install_generate_route() -> None:
    """Wraps `GenerationMixin._assisted_decoding` so SpecVLM drafts use the tree loop. Idempotent."""
    previous = GenerationMixin._assisted_decoding
    if getattr(previous, _ROUTE_FLAG, False):
        return

    @functools.wraps(previous)
    def _assisted_decoding(self, *args: Any, **kwargs: Any):
        if is_specvlm_draft(kwargs.get("assistant_model")):
            from .loop import tree_assisted_decoding

            return tree_assisted_decoding(self, *args, **kwargs)
        return previous(self, *args, **kwargs)

    setattr(_assisted_decoding, _ROUTE_FLAG, True)
    _assisted_decoding._specvlm_original = previous
    GenerationMixin._assisted_decoding = _assisted_decoding


def uninstall_generate_route() -> None:
    """Restores transformers' own `_assisted_decoding`."""
    current = GenerationMixin._assisted_decoding
    original = getattr(current, "_specvlm_original", None)
    if original is not None:
        GenerationMixin._assisted_decoding = original
