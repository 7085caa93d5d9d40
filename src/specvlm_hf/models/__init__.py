"""Model classes: the SpecVLM draft and the elastic visual compressor it can carry."""

from .configuration_elastic_compressor import ElasticCompressorConfig
from .configuration_specvlm_draft import (
    AUTO_DRAFT_VOCAB_LOWEST_SHARE,
    AUTO_DRAFT_VOCAB_MAX_FULL,
    AUTO_DRAFT_VOCAB_SIZE,
    SpecVLMDraftConfig,
)
from .modeling_elastic_compressor import CompressorOutput, ElasticVisualCompressor
from .modeling_specvlm_draft import (
    DRAFT_MARKER,
    SpecVLMDraftModel,
    SpecVLMDraftOutput,
    SpecVLMDraftPreTrainedModel,
    compressor_config_for_draft,
    default_draft_vocab_ids,
    resolve_draft_vocab_size,
    special_token_ids,
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
    "default_draft_vocab_ids",
    "resolve_draft_vocab_size",
    "special_token_ids",
    "AUTO_DRAFT_VOCAB_MAX_FULL",
    "AUTO_DRAFT_VOCAB_SIZE",
    "AUTO_DRAFT_VOCAB_LOWEST_SHARE",
]
