"""Model classes: the SpecVLM draft and the elastic visual compressor it can carry."""

from .configuration_elastic_compressor import ElasticCompressorConfig
from .configuration_specvlm_draft import SpecVLMDraftConfig
from .modeling_elastic_compressor import CompressorOutput, ElasticVisualCompressor
from .modeling_specvlm_draft import (
    DRAFT_MARKER,
    SpecVLMDraftModel,
    SpecVLMDraftOutput,
    SpecVLMDraftPreTrainedModel,
    compressor_config_for_draft,
)

__all__ = [
    "SpecVLMDraftConfig",
    "SpecVLMDraftModel",
    "SpecVLMDraftOutput",
    "SpecVLMDraftPreTrainedModel",
    "DRAFT_MARKER",
    "ElasticCompressorConfig",
    "ElasticVisualCompressor",
    "CompressorOutput",
    "compressor_config_for_draft",
]
