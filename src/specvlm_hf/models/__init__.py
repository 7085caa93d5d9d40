"""Model classes: the SpecVLM draft (and, with the compressor issue, the elastic visual compressor)."""

from .configuration_specvlm_draft import SpecVLMDraftConfig
from .modeling_specvlm_draft import DRAFT_MARKER, SpecVLMDraftModel, SpecVLMDraftOutput, SpecVLMDraftPreTrainedModel

__all__ = ["SpecVLMDraftConfig", "SpecVLMDraftModel", "SpecVLMDraftOutput", "SpecVLMDraftPreTrainedModel", "DRAFT_MARKER"]
