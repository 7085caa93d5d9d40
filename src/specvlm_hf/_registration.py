"""Import-time registration: Auto classes, `auto_map` support and the `generate(assistant_model=draft)` route."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from .models import SpecVLMDraftConfig, SpecVLMDraftModel


def register_auto_classes() -> None:
    """Registers the draft with `AutoConfig`/`AutoModel` in-process and for `auto_map` on save. Idempotent."""
    if SpecVLMDraftConfig.model_type != "specvlm_draft":  # pragma: no cover - guards accidental edits
        raise RuntimeError(f"unexpected draft model_type {SpecVLMDraftConfig.model_type!r}")
    AutoConfig.register(SpecVLMDraftConfig.model_type, SpecVLMDraftConfig, exist_ok=True)
    AutoModel.register(SpecVLMDraftConfig, SpecVLMDraftModel, exist_ok=True)
    SpecVLMDraftConfig.register_for_auto_class()
    SpecVLMDraftModel.register_for_auto_class("AutoModel")
