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

from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin

DRAFT_MARKER = "_is_specvlm_draft"
_ROUTE_FLAG = "_specvlm_route"
#: Per-call tree knobs accepted by `generate(..., assistant_model=draft, tree_depth=4)`. Declared on
#: `GenerationConfig` (default `None` = use the draft config's value) so `generate` files them into the generation
#: config instead of rejecting them as unknown model kwargs.
GENERATE_KNOBS = ("tree_top_k", "tree_depth", "tree_total_tokens")
#: Per-call switches of the loop (default `None` = automatic), declared on `GenerationConfig` like the tree knobs.
GENERATE_SWITCHES = ("exact_verification", "tree_drafter", "tree_adaptive", "tree_ngram_tokens", "tree_ngram_max",
                     "tree_batched")


def is_specvlm_draft(model: Any) -> bool:
    """True when `model` is a SpecVLM draft (installed class or the same class loaded as remote code)."""
    return model is not None and bool(getattr(type(model), DRAFT_MARKER, False))


def install_generate_route() -> None:
    """
    Wraps `GenerationMixin._assisted_decoding` so SpecVLM drafts use the tree loop, and
    `GenerationMixin._validate_generation_mode` so settings that would silently drop the draft (beam search, ...)
    raise instead. Idempotent.
    """
    for knob in GENERATE_KNOBS + GENERATE_SWITCHES:
        if not hasattr(GenerationConfig, knob):
            setattr(GenerationConfig, knob, None)
    _install_validation()
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


def _install_validation() -> None:
    previous = GenerationMixin._validate_generation_mode
    if getattr(previous, _ROUTE_FLAG, False):
        return

    @functools.wraps(previous)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        draft = generation_mode_kwargs.get("assistant_model")
        if not is_specvlm_draft(draft):
            return previous(self, generation_mode, generation_config, generation_mode_kwargs)
        # before stock validation, whose vocabulary check would blame tokenizers for a draft built for another target
        draft.check_compatible(self)
        if generation_mode != GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                f"A SpecVLM draft was passed as assistant_model, but these settings select {generation_mode.value!r} "
                f"(num_beams={generation_config.num_beams}), which would silently ignore the draft. Tree speculation "
                "supports greedy decoding and sampling: set num_beams=1 or drop assistant_model."
            )
        return previous(self, generation_mode, generation_config, generation_mode_kwargs)

    setattr(_validate_generation_mode, _ROUTE_FLAG, True)
    _validate_generation_mode._specvlm_original = previous
    GenerationMixin._validate_generation_mode = _validate_generation_mode


def uninstall_generate_route() -> None:
    """Restores transformers' own `_assisted_decoding` and generation-mode validation."""
    for name in ("_assisted_decoding", "_validate_generation_mode"):
        original = getattr(getattr(GenerationMixin, name), "_specvlm_original", None)
        if original is not None:
            setattr(GenerationMixin, name, original)
