# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of the SpecVLM (EagleVLM) draft model.

This file is self-contained (it imports only `transformers`) so that it can be shipped next to a checkpoint through
`auto_map` and loaded with `trust_remote_code=True` by users who do not have `specvlm_hf` installed.
"""


from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


#: `from_target` keeps the target's full LM head for vocabularies up to this size (`draft_vocab_size=None`).
AUTO_DRAFT_VOCAB_MAX_FULL = 65536
#: Size of the reduced head `from_target` gives drafts of larger vocabularies. Measured on Gemma-3-270M (262,144
#: tokens, width 640), fp32, 2 CPU cores: one 8-row draft expansion step costs 0.053 of a target decode step with a
#: 64-id head (the decoder layer alone), 0.062 with 2,048 ids, 0.076 with 4,096, 0.26 with 32,768 and 1.7 with the
#: full head; 2,048 ids keep the head's share near 0.01 while covering 63 % of the target's own greedy tokens (32,768:
#: 87 %). On accelerators, where the head costs little, pass a larger `draft_vocab_size` (EAGLE-3 uses 32,768).
AUTO_DRAFT_VOCAB_SIZE = 2048
#: Share of a data-free reduced vocabulary taken from the lowest ids; the rest follows the LM-head-row prior.
AUTO_DRAFT_VOCAB_LOWEST_SHARE = 0.75


@strict
class SpecVLMDraftConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SpecVLMDraftModel`]: an EAGLE-2-style one-layer draft (SpecVLM's *EagleVLM*) that reads the
    target model's own features. Every knob that shapes the draft's behaviour, including the speculation tree, lives
    here and is saved with the checkpoint; the tree knobs can be overridden per `generate` call.

    Build one for a given target with [`SpecVLMDraftModel.from_target`] rather than by hand: it copies the target's
    text dimensions and records where the draft came from.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Vocabulary size of the **target** (the draft proposes target token ids). `generate` compares it with the
            target's text config, so it must equal the target's.
        hidden_size (`int`, *optional*, defaults to 4096):
            Width of the draft's residual stream. Equals the target's text hidden size, because the draft's output is
            read by the target's LM head and regressed onto the target's features.
        intermediate_size (`int`, *optional*, defaults to 11008):
            Width of the draft decoder layer's MLP.
        num_hidden_layers (`int`, *optional*, defaults to 1):
            Number of Llama-style decoder layers in the draft (EAGLE-2 and SpecVLM use 1).
        num_attention_heads (`int`, *optional*, defaults to 32):
            Attention heads of the draft decoder layer(s).
        num_key_value_heads (`int`, *optional*):
            Key/value heads (GQA). Defaults to `num_attention_heads`.
        head_dim (`int`, *optional*):
            Per-head width. Defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            MLP activation.
        max_position_embeddings (`int`, *optional*, defaults to 8192):
            Longest position the draft's rotary embedding is prepared for.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMS norms.
        rope_parameters (`dict`, *optional*):
            Rotary embedding parameters, e.g. `{"rope_type": "default", "rope_theta": 10000.0}`. The draft always uses
            1-D positions (token indices), also for mRoPE targets such as Qwen2-VL.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether q/k/v/o projections of the draft layer have a bias.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser.
        target_hidden_size (`int`, *optional*):
            Width of one tapped target feature. Defaults to `hidden_size`.
        target_layer_ids (`list[int]`, *optional*, defaults to `[-1]`):
            Indices into the target's `hidden_states` tuple whose activations feed the draft (`-1` = the final-norm
            output, i.e. the LM-head input, as in EAGLE-2/SpecVLM; index 0 is the embedding output). Several indices
            (EAGLE-3 style) are concatenated and projected to `hidden_size` by `feature_proj` before the `fc` fusion.

            Multi-layer fusion (EAGLE-3): tap one low, one middle and one high layer of a target with `N` decoder
            layers, e.g. `[2, N // 2, N - 3]` as EAGLE-3 does (hidden state `k` is the input of decoder layer `k`, so
            these are the inputs of layers 2, N/2 and N-3): low layers carry the token identity, middle ones the
            context, high ones what the target is about to predict. Keep `-1` (the LM-head input) among them when
            the draft is small or training data is scarce: it is the easiest feature to regress from. More taps widen
            only `feature_proj` (`target_hidden_size * len(target_layer_ids)` inputs), not the draft's step cost.
            Inside a draft tree, and in the steps `i > 0` of training-time test, the draft's own output (width
            `hidden_size`) takes the place of the *projected* feature (`feature_proj` is skipped for it), as in
            EAGLE-3, which feeds its hidden state after the fc projection.
        input_norm (`bool`, *optional*, defaults to `True`):
            SpecVLM's one change to EAGLE-2: an RMSNorm on the fused input before the decoder layer(s).
        draft_vocab_size (`int`, *optional*):
            Size of the draft's own reduced LM head (EAGLE-3 style), so that a draft step does not cost more with a
            larger target vocabulary. The draft then scores only `draft_vocab_size` target ids (its `d2t` buffer,
            saved with the checkpoint) and tokens outside them can only come from the target's bonus token; output
            stays lossless. `None` or `0`: the draft reads the target's full LM head.

            [`SpecVLMDraftModel.from_target`] chooses it when it is not given (`None` or `"auto"`): the target's full
            head up to `AUTO_DRAFT_VOCAB_MAX_FULL` (65,536) tokens, else a reduced head of `AUTO_DRAFT_VOCAB_SIZE`
            (2,048) tokens; `0` or `"full"` forces the full head and an integer forces that size. The resolved value
            is what the config stores (a loaded checkpoint never changes its head). The ids of such a data-free head
            (see [`default_draft_vocab_ids`]) are, in order:

            1. every special id named by the target's configs: the `*_token_id`, `*_token_ids` and `*_token_index`
               entries of its config, its text config and its generation config (bos, eos, pad, image/video and
               vision start/end tokens...);
            2. the lowest ids, up to `AUTO_DRAFT_VOCAB_LOWEST_SHARE` (3/4) of the size (BPE tokenizers give lower ids
               to earlier, more frequent merges);
            3. the rest: the ids whose LM-head rows have the lowest dot product with the mean row (a frequency proxy
               read from the weights; ties go to the smaller id). SentencePiece vocabularies such as Gemma's put
               single characters and punctuation at the top of the id range, which rule 2 alone misses.

            Its head is initialised with the target's LM-head rows of those ids, so an untrained reduced head ranks
            them exactly as the target's head does. A vocabulary built from training data
            (`specvlm_hf.build_draft_vocab`) replaces it.
        tree_top_k (`int`, *optional*, defaults to 8):
            Children expanded per frontier node and frontier width of the EAGLE-2 dynamic tree.
        tree_depth (`int`, *optional*, defaults to 5):
            Maximum depth of the draft tree, i.e. draft forwards per cycle after the catch-up forward.
        tree_total_tokens (`int`, *optional*, defaults to 24):
            Draft tokens kept per tree after reranking, **root excluded** (one verification forward sees
            `tree_total_tokens + 1` tokens). `tree_top_k=1` gives a chain of `min(tree_depth, tree_total_tokens)`.
        tree_adaptive (`bool`, *optional*, defaults to `True`):
            Size every tree during generation from the measured costs of verification and drafting and the draft's
            calibrated path probabilities (`specvlm_hf.generation.adaptive`); `tree_depth` and `tree_total_tokens`
            are then upper bounds. `False` keeps the tree fixed at those knobs.
        tree_ngram_tokens (`int`, *optional*, defaults to 10):
            Length of the n-gram branch merged into every tree: the tokens that followed the latest earlier
            occurrence of the context's last `tree_ngram_max`..1 tokens (prompt lookup inside the tree,
            `specvlm_hf.generation.ngram`). `0` turns it off.
        tree_ngram_max (`int`, *optional*, defaults to 3):
            Longest suffix the n-gram branch matches first.
        compressor_config (`dict`, *optional*):
            Configuration of the elastic visual compressor saved inside the checkpoint (`None`: the draft sees every
            visual token).
        target_model_name_or_path (`str`, *optional*):
            Provenance: name or path of the target this draft was built for.
        target_model_type (`str`, *optional*):
            Provenance: `model_type` of that target.
        target_revision (`str`, *optional*):
            Provenance: revision (commit hash) of that target when known.
        specvlm_hf_version (`str`, *optional*):
            Version of `specvlm_hf` that created the checkpoint.
        training_recipe (`dict`, *optional*):
            Provenance: how the draft was last trained, written by `OnlineDistillationTrainer` (so that every saved
            checkpoint records it): `{"ttt_steps": K, "ttt_decay": d, "multi_layer_features": bool,
            "target_layer_ids": [...], "lambda_logit": ..., "lambda_feat": ..., "feature_noise": ...}`. `ttt_steps`
            1 is the EAGLE-1 recipe, `K > 1` EAGLE-3's training-time test; `multi_layer_features` is true when the
            draft fuses several target layers. `None` for a draft that was never trained with this library. It does
            not change how the draft runs.

    Example:

    ```python
    >>> from transformers import AutoModelForImageTextToText
    >>> from specvlm_hf import SpecVLMDraftModel

    >>> target = AutoModelForImageTextToText.from_pretrained("llava-hf/llava-1.5-7b-hf")
    >>> draft = SpecVLMDraftModel.from_target(target, tree_total_tokens=32)
    >>> draft.config.hidden_size == target.config.text_config.hidden_size
    True
    ```
    """

    model_type = "specvlm_draft"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = False
    initializer_range: float = 0.02
    target_hidden_size: int | None = None
    target_layer_ids: list[int] | None = None
    input_norm: bool = True
    draft_vocab_size: int | None = None
    tree_top_k: int = 8
    tree_depth: int = 5
    tree_total_tokens: int = 24
    tree_adaptive: bool = True
    tree_ngram_tokens: int = 10
    tree_ngram_max: int = 3
    compressor_config: dict | None = None
    target_model_name_or_path: str | None = None
    target_model_type: str | None = None
    target_revision: str | None = None
    specvlm_hf_version: str | None = None
    training_recipe: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if self.target_layer_ids is None:
            self.target_layer_ids = [-1]
        else:
            self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.draft_vocab_size == 0:  # 0 = the target's full head
            self.draft_vocab_size = None
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field checks (run by `@strict` on construction and on `from_pretrained`)."""
        problems = []
        if self.num_hidden_layers < 1:
            problems.append(f"num_hidden_layers must be >= 1 (got {self.num_hidden_layers})")
        if self.num_attention_heads % max(self.num_key_value_heads or 1, 1) != 0:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.tree_top_k < 1:
            problems.append(f"tree_top_k must be >= 1 (got {self.tree_top_k})")
        if self.tree_depth < 1:
            problems.append(f"tree_depth must be >= 1 (got {self.tree_depth})")
        if self.tree_total_tokens < 1:
            problems.append(f"tree_total_tokens must be >= 1 (got {self.tree_total_tokens})")
        if self.tree_ngram_tokens < 0:
            problems.append(f"tree_ngram_tokens must be >= 0 (got {self.tree_ngram_tokens})")
        if self.tree_ngram_max < 1:
            problems.append(f"tree_ngram_max must be >= 1 (got {self.tree_ngram_max})")
        if self.target_layer_ids is not None and len(self.target_layer_ids) == 0:
            problems.append("target_layer_ids must name at least one target layer")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            problems.append(
                f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}] (got {self.draft_vocab_size})"
            )
        if problems:
            raise ValueError("Invalid SpecVLMDraftConfig: " + "; ".join(problems) + ".")


__all__ = [
    "AUTO_DRAFT_VOCAB_LOWEST_SHARE",
    "AUTO_DRAFT_VOCAB_MAX_FULL",
    "AUTO_DRAFT_VOCAB_SIZE",
    "SpecVLMDraftConfig",
]
