# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SpecVLM draft model (EagleVLM): an EAGLE-2-style feature-level draft composed from stock transformers layers.

Architecture (SpecVLM §3.3, EAGLE-2)::

    [embedding of token t+1 ; target feature f_t]  --fc (2H -> H)-->  input RMSNorm  -->  N Llama decoder layers
        --> predicted feature f_{t+1}  --> LM head (the target's own, or a reduced draft head)

With a `compressor_config` the draft also owns an [`ElasticVisualCompressor`] (SpecVLM §3.4) that shortens its prefill
by compressing the image spans of the fused inputs; the target always sees every visual token.

The target's embedding and LM head are *used at run time* and never stored in the draft checkpoint. This file only
imports `transformers` and its sibling files (draft configuration, compressor configuration and model), so it can
travel with a checkpoint through `auto_map`: `save_pretrained` copies those sibling files next to it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_elastic_compressor import ElasticCompressorConfig
from .configuration_specvlm_draft import (
    AUTO_DRAFT_VOCAB_LOWEST_SHARE,
    AUTO_DRAFT_VOCAB_MAX_FULL,
    AUTO_DRAFT_VOCAB_SIZE,
    SpecVLMDraftConfig,
)
from .modeling_elastic_compressor import CompressorOutput, ElasticVisualCompressor


if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel as _Target

try:  # the library's error type, so that the `specvlm` CLI reports it as a user error
    from specvlm_hf.errors import UserValueError
except ImportError:  # loaded as remote code without the library

    class UserValueError(ValueError):
        """A bad value: here, an unusable draft."""

#: Class attribute that marks a SpecVLM draft. Checked by duck typing because classes loaded as remote code are
#: distinct objects from the installed ones.
DRAFT_MARKER = "_is_specvlm_draft"

#: The fields of an `ElasticCompressorConfig` that a draft stores in `SpecVLMDraftConfig.compressor_config`.
_COMPRESSOR_FIELDS = tuple(ElasticCompressorConfig.__annotations__)

#: How many offending tensors a non-finite-weights error names before it only counts the rest.
_NAMED_TENSORS = 5


def _describe_non_finite(bad: list[tuple[str, int, int]]) -> str:
    """`"2 tensors: fc.weight (12 NaN), fc.bias (1 Inf)"` for the output of `non_finite_parameters`."""
    described = []
    for name, nan, inf in bad[:_NAMED_TENSORS]:
        counts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
        described.append(f"{name} ({', '.join(counts)})")
    text = ", ".join(described)
    if len(bad) > _NAMED_TENSORS:
        text += f" and {len(bad) - _NAMED_TENSORS} more"
    return f"{len(bad)} tensor{'s' * (len(bad) != 1)}: {text}"


def compressor_config_for_draft(
    draft_config: SpecVLMDraftConfig, compressor_config: ElasticCompressorConfig | dict[str, Any]
) -> ElasticCompressorConfig:
    """
    The compressor configuration a draft builds from `compressor_config`.

    The widths always come from the draft: `hidden_size` is the draft's width and `gate_input_size` the width of its
    target features (`target_hidden_size * len(target_layer_ids)`, see [`ElasticCompressorConfig.for_draft`]). A
    `resampler_num_heads` equal to the default derived from the given `hidden_size` is derived again for the draft's
    width; every other field is kept.

    Args:
        draft_config (`SpecVLMDraftConfig`): the draft's configuration.
        compressor_config (`ElasticCompressorConfig` or `dict`): the requested compressor, e.g.
            `ElasticCompressorConfig(mode="weighted")` or the dictionary stored in a checkpoint.

    Returns:
        [`ElasticCompressorConfig`]
    """
    if isinstance(compressor_config, PreTrainedConfig):
        values = compressor_config_to_dict(compressor_config)
    else:
        values = dict(compressor_config)
    given_hidden = values.pop("hidden_size", None)
    values.pop("gate_input_size", None)
    heads = values.get("resampler_num_heads")
    if given_hidden is not None and heads == ElasticCompressorConfig(hidden_size=given_hidden).resampler_num_heads:
        del values["resampler_num_heads"]
    return ElasticCompressorConfig.for_draft(draft_config, **values)


def compressor_config_to_dict(compressor_config: ElasticCompressorConfig) -> dict[str, Any]:
    """The compressor's own fields (without the generic `PreTrainedConfig` attributes), as stored in a draft config."""
    values = compressor_config.to_dict()
    return {name: values[name] for name in _COMPRESSOR_FIELDS}


def resolve_draft_vocab_size(vocab_size: int, requested: int | str | None = None) -> int | None:
    """
    The reduced-head size a draft of a `vocab_size`-token target gets (`None`: the target's full head).

    Args:
        vocab_size (`int`): the target's vocabulary size.
        requested (`int` or `str`, *optional*): `None` or `"auto"`: the full head up to `AUTO_DRAFT_VOCAB_MAX_FULL`
            tokens, else `AUTO_DRAFT_VOCAB_SIZE`; `0` or `"full"`: the full head; a positive integer: that size.

    Returns:
        `int` or `None`
    """
    if requested is None or (isinstance(requested, str) and requested.lower() == "auto"):
        return None if vocab_size <= AUTO_DRAFT_VOCAB_MAX_FULL else min(AUTO_DRAFT_VOCAB_SIZE, vocab_size)
    if isinstance(requested, str):
        if requested.lower() == "full":
            return None
        raise ValueError(f'draft_vocab_size must be an integer, "auto" or "full" (got {requested!r})')
    if isinstance(requested, bool) or int(requested) != requested or requested < 0:
        raise ValueError(f'draft_vocab_size must be an integer >= 0, "auto" or "full" (got {requested!r})')
    return int(requested) or None


def special_token_ids(target: "_Target") -> list[int]:
    """
    Every token id the target's configs name: the integer (or list of integers) entries whose key ends in `token_id`,
    `token_ids` or `token_index` of its config, its text config and its generation config (bos, eos, pad, image and
    video placeholders, vision start/end, ...), restricted to `[0, vocab_size)`, sorted.
    """
    vocab_size = target.config.get_text_config().vocab_size
    found: set[int] = set()
    sources = [target.config, target.config.get_text_config(), getattr(target, "generation_config", None)]
    for source in sources:
        if source is None:
            continue
        for key, value in vars(source).items():
            if not key.endswith(("token_id", "token_ids", "token_index")):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size)
    return sorted(found)


def default_draft_vocab_ids(target: "_Target", size: int) -> torch.LongTensor:
    """
    The data-free reduced draft vocabulary of `size` target ids (the rule of `SpecVLMDraftConfig.draft_vocab_size`):
    the target's special ids ([`special_token_ids`]), then the lowest ids up to `AUTO_DRAFT_VOCAB_LOWEST_SHARE` of
    `size`, then the ids whose LM-head rows have the lowest dot product with the mean row (ties: smaller id).

    The last rule is a frequency proxy read from the weights: the output rows of rare tokens stay close to a common
    direction, those of frequent tokens are pushed away from it. Measured on Gemma-3-270M (262,144 tokens) and
    SmolLM2-135M (49,152), the mix covers more of real text and of the target's own greedy output than either rule
    alone (README, *Reduced draft vocabulary*).

    Args:
        target (`PreTrainedModel`): the target (its configs and LM head are read, nothing runs).
        size (`int`): vocabulary size, at least the number of special ids and at most `vocab_size`.

    Returns:
        `torch.LongTensor` of shape `(size,)`, sorted, on the CPU.
    """
    vocab_size = target.config.get_text_config().vocab_size
    specials = special_token_ids(target)
    if not len(specials) <= size <= vocab_size:
        raise ValueError(
            f"a draft vocabulary of the target's {len(specials)} special ids must have between {len(specials)} and "
            f"{vocab_size} tokens (got {size})"
        )
    chosen = torch.zeros(vocab_size, dtype=torch.bool)
    chosen[specials] = True
    n_lowest = max(int(size * AUTO_DRAFT_VOCAB_LOWEST_SHARE) - len(specials), 0)
    free = (~chosen).nonzero().flatten()
    chosen[free[:n_lowest]] = True
    missing = size - int(chosen.sum())
    if missing > 0:
        head = target.get_output_embeddings()
        if head is None:  # no head to read: keep counting up from the lowest ids
            chosen[(~chosen).nonzero().flatten()[:missing]] = True
        else:
            with torch.no_grad():
                weight = head.weight[:vocab_size]
                mean_row = weight.mean(dim=0, dtype=torch.float32).to(weight.dtype)
                prior = (weight @ mean_row).float().cpu()
            prior[chosen] = float("inf")
            chosen[torch.argsort(prior, stable=True)[:missing]] = True  # stable: ties keep ascending ids
    return chosen.nonzero().flatten()


@dataclass
class SpecVLMDraftOutput(ModelOutput):
    """
    Output of [`SpecVLMDraftModel.forward`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Predicted target features: position `t` predicts the target's feature at `t + 1`. Apply
            [`SpecVLMDraftModel.compute_logits`] to read draft-token logits from them.
        past_key_values (`Cache`, *optional*):
            The draft's own key/value cache when `use_cache=True`.
        compressor_output (`CompressorOutput`, *optional*):
            When the call compressed its image spans (`visual_mask` given to a draft with a compressor): the
            compressor's output. `last_hidden_state` then has its length `L'`, and position `j` of row `b` carries the
            prediction of input position `compressor_output.kept_index[b, j]`.
        logits (`torch.FloatTensor` of shape `(num_selected, draft_vocab_size)`, *optional*):
            With `logits_mask` and a draft head of its own (`config.draft_vocab_size`): the head's logits at the
            selected output positions, in `nonzero()` order of the output-coordinate mask (see [`forward`]).
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    compressor_output: CompressorOutput | None = None
    logits: torch.FloatTensor | None = None


def _additive_causal_mask(
    attention_mask_2d: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Builds a `(batch, 1, q_len, past_len + q_len)` additive causal mask (0 = attend, dtype min = masked)."""
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask_2d is not None:
        if attention_mask_2d.shape[-1] != kv_len:
            raise ValueError(
                f"2-D attention_mask has length {attention_mask_2d.shape[-1]}, expected past + current = {kv_len}."
            )
        allowed = allowed & attention_mask_2d[:, None, None, :].bool()
        # rows that see nothing (left padding) would give NaN in softmax: let them see themselves
        diag = (k_pos == q_pos)[None, None]
        allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class SpecVLMDraftPreTrainedModel(PreTrainedModel):
    """Base class: weight initialisation, attention-backend flags and the routing marker."""

    config: SpecVLMDraftConfig
    config_class = SpecVLMDraftConfig
    base_model_prefix = "draft"
    main_input_name = "inputs_embeds"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _is_specvlm_draft = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, LlamaRMSNorm):
            module.weight.fill_(1.0)
        else:
            # everything else, notably the rotary embedding's non-persistent `inv_freq` buffers: they are not in the
            # checkpoint, so `from_pretrained` (which builds on the meta device) must recompute them here
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args: Any, **kwargs: Any):
        """
        [`~transformers.PreTrainedModel.from_pretrained`], then a check that every loaded parameter is finite: a
        checkpoint with NaN or Inf weights (a diverged training run, a corrupt file) raises a `ValueError` naming the
        offending tensors instead of loading a draft whose proposals are never accepted.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        bad = model.non_finite_parameters()
        if bad:
            raise UserValueError(
                f"draft checkpoint {pretrained_model_name_or_path} has non-finite values in "
                f"{_describe_non_finite(bad)}; the checkpoint is corrupt or training diverged: retrain or load an "
                "earlier checkpoint."
            )
        return loaded

    def non_finite_parameters(self) -> list[tuple[str, int, int]]:
        """
        The draft's own parameters that hold NaN or Inf values (one `torch.isfinite` pass per tensor; tensors not
        materialised, e.g. offloaded to the meta device, and non-float tensors are skipped).

        A tensor that passed is remembered with its storage and in-place version counter and skipped until either
        changes, so repeated checks (one per `generate` call) are cheap.

        Returns:
            `list[tuple[str, int, int]]`: `(name, number of NaN, number of Inf)` per offending parameter, in
            `named_parameters()` order; empty when every value is finite.
        """
        bad = []
        # a tensor whose storage and in-place version counter are unchanged since it last passed is not scanned again
        # (an optimizer step, `load_state_dict` or any in-place write bumps the counter; a new `.data` moves storage),
        # so `generate`'s check before every call costs a pass over the weights only after they change
        passed = self.__dict__.setdefault("_finite_passed", {})
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if not parameter.is_floating_point() or parameter.device.type == "meta":
                    continue
                stamp = (parameter.data_ptr(), parameter._version, parameter.dtype, tuple(parameter.shape))
                if passed.get(name) == stamp:
                    continue
                if bool(torch.isfinite(parameter).all()):
                    passed[name] = stamp
                else:
                    passed.pop(name, None)
                    bad.append((name, int(torch.isnan(parameter).sum()), int(torch.isinf(parameter).sum())))
        return bad


class SpecVLMDraftModel(SpecVLMDraftPreTrainedModel):
    r"""
    The SpecVLM draft (*EagleVLM*). Pass it to any supported target as `assistant_model`:

    ```python
    >>> import specvlm_hf  # registers the Auto classes and the generate route
    >>> from transformers import AutoModel
    >>> draft = AutoModel.from_pretrained("path/to/draft")
    >>> out = target.generate(**inputs, assistant_model=draft, max_new_tokens=128)
    ```

    Greedy output is token-identical to `target.generate(**inputs)` and sampled output has the same distribution;
    the draft only changes how fast the tokens come.

    When `config.compressor_config` is set, `compressor` is an [`ElasticVisualCompressor`] (else `None`): `generate`
    then compresses the image spans of the draft's prefill (see [`fuse_and_compress`]), which shortens the draft's
    prefill and KV cache without touching the target.
    """

    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__(config)
        hidden = config.hidden_size
        feature_width = config.target_hidden_size * len(config.target_layer_ids)
        self.feature_proj = nn.Linear(feature_width, hidden, bias=False) if feature_width != hidden else None
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.input_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps) if config.input_norm else None
        text_config = self._layer_config(config)
        self.layers = nn.ModuleList([LlamaDecoderLayer(text_config, i) for i in range(config.num_hidden_layers)])
        self.rotary_emb = LlamaRotaryEmbedding(config=text_config)
        if config.draft_vocab_size is not None:
            self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long), persistent=True)
        else:
            self.lm_head = None
            self.register_buffer("d2t", None, persistent=True)  # filled by set_draft_vocab
        if config.compressor_config is not None:
            compressor_config = compressor_config_for_draft(config, config.compressor_config)
            config.compressor_config = compressor_config_to_dict(compressor_config)
            self.compressor = ElasticVisualCompressor(compressor_config)
        else:
            self.compressor = None
        self.gradient_checkpointing = False
        self.post_init()

    @staticmethod
    def _layer_config(config: SpecVLMDraftConfig) -> LlamaConfig:
        layer_config = LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=dict(config.rope_parameters),
            attention_bias=config.attention_bias,
        )
        layer_config._attn_implementation = config._attn_implementation or "sdpa"
        return layer_config

    # ------------------------------------------------------------------------------------------------------------
    # target-facing helpers
    # ------------------------------------------------------------------------------------------------------------
    @property
    def feature_layer_ids(self) -> list[int]:
        """Indices into the target's `hidden_states` that the draft needs: 0 (embeddings) plus the feature taps."""
        return sorted({0, *self.config.target_layer_ids}, key=lambda i: (i < 0, i))

    def select_features(self, hidden_states: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """
        Concatenates the tapped target activations.

        Args:
            hidden_states (`tuple[torch.Tensor]`): the target's `hidden_states` output (entries may be `None` for layers
                that were not captured); each of shape `(batch_size, sequence_length, target_hidden_size)`.

        Returns:
            `torch.Tensor` of shape `(batch_size, sequence_length, target_hidden_size * len(target_layer_ids))`.
        """
        taps = []
        for layer_id in self.config.target_layer_ids:
            tap = hidden_states[layer_id]
            if tap is None:
                raise ValueError(f"Target hidden state {layer_id} was not captured; request {self.feature_layer_ids}.")
            taps.append(tap)
        return taps[0] if len(taps) == 1 else torch.cat(taps, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor, target_lm_head: nn.Module | None = None) -> torch.Tensor:
        """
        Draft logits from predicted features.

        Args:
            hidden_states (`torch.Tensor` of shape `(..., hidden_size)`): output of [`forward`].
            target_lm_head (`nn.Module`, *optional*): the target's LM head; required unless the draft has a reduced
                vocabulary of its own (`config.draft_vocab_size`).

        Returns:
            `torch.Tensor` of shape `(..., vocab)` where `vocab` is `draft_vocab_size` when set (map indices to target
            ids with [`draft_to_target`]) and the target vocabulary otherwise.
        """
        if self.lm_head is not None:
            return self.lm_head(hidden_states)
        if target_lm_head is None:
            raise ValueError("This draft shares the target's LM head: pass `target_lm_head=target.get_output_embeddings()`.")
        return target_lm_head(hidden_states)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Maps draft-vocabulary indices to target token ids (identity without a reduced vocabulary)."""
        return draft_ids if self.d2t is None else self.d2t[draft_ids]

    def set_draft_vocab(self, token_ids: torch.Tensor, target_lm_head_weight: torch.Tensor) -> None:
        """
        Installs a reduced draft vocabulary (EAGLE-3 style): the draft's head then scores only `token_ids`.

        Args:
            token_ids (`torch.LongTensor` of shape `(draft_vocab_size,)`): target ids kept, e.g. the most frequent
                tokens of the training data (see `specvlm_hf.build_draft_vocab`).
            target_lm_head_weight (`torch.Tensor` of shape `(vocab_size, hidden_size)`): initialises the new head with
                the target's rows, so an untrained reduced head ranks its tokens exactly like the target's head.
        """
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique(sorted=True)
        if token_ids.numel() == 0 or int(token_ids.max()) >= self.config.vocab_size or int(token_ids.min()) < 0:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.config.vocab_size}).")
        weight = target_lm_head_weight.detach()[token_ids.to(target_lm_head_weight.device)]
        head = nn.Linear(self.config.hidden_size, token_ids.numel(), bias=False)
        head = head.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        head.weight.data.copy_(weight.to(head.weight))
        self.lm_head = head
        self._buffers["d2t"] = token_ids.to(self.fc.weight.device)  # registered (possibly as None) in __init__
        self.config.draft_vocab_size = int(token_ids.numel())

    def shrink_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """
        Keeps only `token_ids` of a reduced draft vocabulary, with the draft's own (trained) head rows: a smaller head
        without retraining. Each step of the draft then reads fewer head weights; a token left out can still be emitted
        (the target's bonus token) but no longer be drafted.

        Args:
            token_ids (`torch.LongTensor` of shape `(new_draft_vocab_size,)`): target ids to keep, all in the current
                draft vocabulary (`self.d2t`); see `specvlm_hf.prune_draft_vocab` for a frequency-based choice.
        """
        if self.lm_head is None or self.d2t is None:
            raise ValueError("This draft scores the target's full vocabulary with the target's head: give it a reduced "
                             "vocabulary with `set_draft_vocab` (or `specvlm_hf.build_draft_vocab`) instead.")
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique(sorted=True).to(self.d2t.device)
        order = torch.argsort(self.d2t)
        sorted_ids = self.d2t[order]
        where = torch.searchsorted(sorted_ids, token_ids).clamp(max=sorted_ids.numel() - 1)
        missing = token_ids[sorted_ids[where] != token_ids]
        if token_ids.numel() == 0 or missing.numel():
            raise ValueError(f"every kept id must be in the draft vocabulary; {missing.numel()} are not "
                             f"(first: {missing[:5].tolist()}).")
        rows = order[where]
        head = nn.Linear(self.config.hidden_size, token_ids.numel(), bias=False)
        head = head.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        head.weight.data.copy_(self.lm_head.weight.detach()[rows])
        self.lm_head = head
        self._buffers["d2t"] = token_ids
        self.config.draft_vocab_size = int(token_ids.numel())

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def fuse(self, inputs_embeds: torch.Tensor, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[emb ; feature] -> fc -> input norm`: the input of the decoder layer(s), `(batch, seq, hidden_size)`."""
        if self.feature_proj is not None and target_hidden_states.shape[-1] != self.config.hidden_size:
            # features arrive in the target's dtype (a bf16 teacher feeding an fp32 draft in training)
            target_hidden_states = self.feature_proj(target_hidden_states.to(self.feature_proj.weight.dtype))
        dtype = self.fc.weight.dtype
        fused = self.fc(torch.cat([inputs_embeds.to(dtype), target_hidden_states.to(dtype)], dim=-1))
        return self.input_norm(fused) if self.input_norm is not None else fused

    def fuse_and_compress(
        self,
        inputs_embeds: torch.Tensor,
        target_hidden_states: torch.Tensor,
        visual_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        grid_sizes: list[list[tuple[int, int] | None] | None] | None = None,
        **compressor_kwargs: Any,
    ) -> CompressorOutput:
        r"""
        Fuses the prefill pairs and compresses their image spans with the draft's [`ElasticVisualCompressor`].

        [`forward`] calls it when given a `visual_mask`; to run the two steps separately, feed the result to
        [`forward`] as `fused_inputs=out.fused, position_ids=out.position_ids, attention_mask=out.attention_mask`.
        Output token `j` of row `b` carries the prediction of input position `out.kept_index[b, j]` (-1 at padding),
        so its training targets are the target's data at `kept_index + 1` (feature) and `kept_index + 2` (token).

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
                Target input embeddings of tokens `t + 1`, as in [`forward`].
            target_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, feature_width)`):
                Target features `f_t` (see [`select_features`]); they also condition the compressor's gate.
            visual_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`):
                Positions whose paired token `x_{t + 1}` is a visual placeholder (image or video token).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real positions, 0 for padding (either side).
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1-D positions of the pairs (default `arange(sequence_length)`); compressed tokens take the positions of
                their source indices.
            grid_sizes (`list[list[tuple[int, int] | None] | None]`, *optional*):
                Per row, per image (in order of appearance), the `(rows, cols)` raster grid of the image's tokens, or
                `None` to compress that image along the sequence.
            compressor_kwargs:
                Further arguments of [`ElasticVisualCompressor.forward`] (`image_ids`, `text_mask`,
                `force_primitive`, `generator`, `padding_side`).

        Returns:
            [`CompressorOutput`]
        """
        if self.compressor is None:
            raise ValueError("This draft has no visual compressor (its config has no `compressor_config`).")
        return self.compressor(
            self.fuse(inputs_embeds, target_hidden_states),
            visual_mask,
            position_ids=position_ids,
            gate_features=target_hidden_states,
            attention_mask=attention_mask,
            grid_sizes=grid_sizes,
            **compressor_kwargs,
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        target_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        fused_inputs: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        grid_sizes: list[list[tuple[int, int] | None] | None] | None = None,
        logits_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SpecVLMDraftOutput:
        r"""
        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Target input embeddings of tokens `t + 1` (EAGLE's shift: position `t` pairs the embedding of the
                *next* token with the feature of the current one). For visual positions these are the target's
                merged visual embeddings (its `hidden_states[0]`). Required unless `fused_inputs` is given.
            target_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, feature_width)`,
                *optional*):
                Target features `f_t` (see [`select_features`]) or, inside a draft tree, the draft's own predictions.
                Required unless `fused_inputs` is given.
            attention_mask (`torch.Tensor`, *optional*):
                Either a 2-D padding mask of shape `(batch_size, past + sequence_length)` (1 = keep) combined with a
                causal mask, or a ready 4-D additive float mask `(batch_size, 1, sequence_length, past + sequence_length)`
                (used as-is; this is how trees are drafted). `None`: causal.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1-D token positions. Defaults to `past + arange(sequence_length)`.
            past_key_values (`Cache`, *optional*):
                The draft's own cache (never the target's).
            use_cache (`bool`, *optional*, defaults to `False`):
                Whether to append this call's keys/values to `past_key_values`.
            fused_inputs (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Already fused inputs (output of [`fuse`]); skips the fusion, e.g. the `fused` output of
                [`fuse_and_compress`] (pass its `position_ids` and `attention_mask` with it).
            visual_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions whose paired token `x_{t + 1}` is a visual placeholder. With a compressor, the image spans are
                compressed before the decoder layer(s) ([`fuse_and_compress`] with this call's `attention_mask` and
                `position_ids`) and the output carries `compressor_output`; ignored by a draft without compressor.
                Only for a call without cached context (a prefill or a training forward) and a 2-D or no
                `attention_mask`.
            grid_sizes (`list[list[tuple[int, int] | None] | None]`, *optional*):
                With `visual_mask`: per row, per image, its `(rows, cols)` raster grid or `None` (see
                [`fuse_and_compress`]).
            logits_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Input positions whose draft-head logits to return in `logits` (a draft with its own reduced head only;
                ignored otherwise). When the call compresses, the mask is carried to the output positions
                (`logits_mask.gather(1, kept_index)` at kept, non-padding outputs). Training computes its logits here
                so that the head is used inside `forward`, as distributed wrappers (DDP's unused-parameter search,
                DeepSpeed) expect.

        Returns:
            [`SpecVLMDraftOutput`]
        """
        compressed = None
        if visual_mask is not None and self.compressor is not None:
            if fused_inputs is not None or (attention_mask is not None and attention_mask.dim() != 2):
                raise ValueError("`visual_mask` needs unfused inputs and a 2-D (or no) attention_mask.")
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("`visual_mask` compresses a whole prefill: the draft cache must be empty.")
            compressed = self.fuse_and_compress(
                inputs_embeds, target_hidden_states, visual_mask, attention_mask, position_ids, grid_sizes
            )
            fused_inputs, position_ids = compressed.fused, compressed.position_ids
            attention_mask = compressed.attention_mask
        if fused_inputs is not None:
            hidden = fused_inputs
        elif inputs_embeds is not None and target_hidden_states is not None:
            hidden = self.fuse(inputs_embeds, target_hidden_states)
        else:
            raise ValueError("Pass `inputs_embeds` and `target_hidden_states`, or already fused `fused_inputs`.")
        batch, q_len = hidden.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=hidden.device)[None].expand(batch, -1)
        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = _additive_causal_mask(attention_mask, q_len, past_len, hidden.dtype, hidden.device)
        else:
            attention_mask = attention_mask.to(hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values if use_cache else None,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
            )
        logits = None
        if logits_mask is not None and self.lm_head is not None:
            if compressed is not None:
                source = compressed.kept_index.clamp(min=0)
                kept = (compressed.kept_index >= 0) & compressed.attention_mask.bool()
                logits_mask = logits_mask.gather(1, source) & kept
            logits = self.lm_head(hidden[logits_mask])
        return SpecVLMDraftOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            compressor_output=compressed,
            logits=logits,
        )

    # ------------------------------------------------------------------------------------------------------------
    # construction from / validation against a target
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def config_from_target(cls, target: "_Target", **overrides: Any) -> SpecVLMDraftConfig:
        """
        Returns a [`SpecVLMDraftConfig`] shaped for `target` (text dims copied), with `overrides` applied; a
        `compressor_config` override (config or dict) is stored as the dictionary of a compressor shaped for the draft.
        """
        text = target.config.get_text_config()
        hidden = text.hidden_size
        heads = getattr(text, "num_attention_heads", None) or max(hidden // 64, 1)
        rope = getattr(text, "rope_parameters", None) or {}
        if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope (Gemma3)
            rope = rope["full_attention"]
        theta = (rope or {}).get("rope_theta", getattr(text, "rope_theta", 10000.0)) or 10000.0
        try:
            from specvlm_hf import __version__ as lib_version
        except ImportError:  # loaded as remote code without the library
            lib_version = None
        values: dict[str, Any] = dict(
            vocab_size=text.vocab_size,
            hidden_size=hidden,
            intermediate_size=getattr(text, "intermediate_size", 4 * hidden),
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            max_position_embeddings=max(getattr(text, "max_position_embeddings", 8192) or 8192, 8192),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
            target_hidden_size=hidden,
            target_model_name_or_path=getattr(target, "name_or_path", None) or getattr(target.config, "_name_or_path", None) or None,
            target_model_type=target.config.model_type,
            target_revision=getattr(target.config, "_commit_hash", None),
            specvlm_hf_version=lib_version,
        )
        compressor_config = overrides.pop("compressor_config", None)
        values["draft_vocab_size"] = resolve_draft_vocab_size(text.vocab_size, overrides.pop("draft_vocab_size", None))
        values.update(overrides)
        config = SpecVLMDraftConfig(**values)
        if compressor_config is not None:
            config.compressor_config = compressor_config_to_dict(compressor_config_for_draft(config, compressor_config))
        return config

    @classmethod
    def from_target(cls, target: "_Target", **overrides: Any) -> "SpecVLMDraftModel":
        r"""
        Builds a correctly shaped, untrained draft for `target`.

        Args:
            target (`PreTrainedModel`): any supported target (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM,
                Gemma3, Llama, Qwen2, ...).
            overrides: any [`SpecVLMDraftConfig`] field, e.g. `tree_total_tokens=32`, `num_hidden_layers=2`,
                `target_layer_ids=[2, 8, -1]`, or `compressor_config=ElasticCompressorConfig(mode="weighted")` (its
                widths are taken from the draft, see [`compressor_config_for_draft`]). `draft_vocab_size` also takes
                `"auto"` (the default: a reduced head for targets of more than 65,536 tokens) and `"full"` (or `0`).

        A reduced head (by default for large vocabularies, or an explicit `draft_vocab_size`) holds the ids of
        [`default_draft_vocab_ids`] and is initialised with the target's LM-head rows of those ids; replace it with
        one built from training data with `specvlm_hf.build_draft_vocab`.

        Returns:
            [`SpecVLMDraftModel`] in the target's dtype and on its device.
        """
        config = cls.config_from_target(target, **overrides)
        draft = cls(config)
        if config.draft_vocab_size is not None:
            head = target.get_output_embeddings()
            if head is None:
                raise ValueError("a reduced draft head is initialised from the target's LM head, which it has none of.")
            draft.set_draft_vocab(default_draft_vocab_ids(target, config.draft_vocab_size), head.weight)
        param = next(target.parameters())
        return draft.to(device=param.device, dtype=param.dtype)

    def compatibility_problems(self, target: "_Target") -> list[str]:
        """Lists every way this draft does not fit `target` (empty when it fits)."""
        text = target.config.get_text_config()
        problems = []
        if text.hidden_size != self.config.target_hidden_size:
            problems.append(f"target hidden size is {text.hidden_size}, the draft expects {self.config.target_hidden_size}")
        if self.lm_head is None and text.hidden_size != self.config.hidden_size:
            problems.append(f"the draft's width {self.config.hidden_size} cannot feed the target LM head ({text.hidden_size})")
        if text.vocab_size != self.config.vocab_size:
            problems.append(f"target vocabulary has {text.vocab_size} tokens, the draft was built for {self.config.vocab_size}")
        head = target.get_output_embeddings()
        if head is not None and head.weight.shape[0] < self.config.vocab_size and self.lm_head is None:
            problems.append(f"target LM head has {head.weight.shape[0]} rows, fewer than the draft's vocabulary")
        n_states = getattr(text, "num_hidden_layers", None)
        if n_states is not None:
            for layer_id in self.config.target_layer_ids:
                if not -(n_states + 1) <= layer_id <= n_states:
                    problems.append(f"target_layer_ids entry {layer_id} is outside the target's {n_states + 1} hidden states")
        return problems

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Uploads the draft with a SpecVLM model card (`specvlm_hf.hub.push_draft_to_hub`); without the library
        installed (remote-code copy) the stock transformers upload is used."""
        try:
            from specvlm_hf.hub import push_draft_to_hub
        except ImportError:  # pragma: no cover
            return super().push_to_hub(repo_id, **kwargs)
        return push_draft_to_hub(self, repo_id, **kwargs)

    def check_compatible(self, target: "_Target") -> None:
        """
        Checks, right before this draft is used with `target`, that it can serve it.

        Raises a `ValueError` that lists what differs when the draft was not built for `target`'s layout (hidden size,
        vocabulary, tapped layers), and one that names the offending tensors when the draft's weights hold NaN or Inf
        (corrupted in memory or by a diverged training step). Warns (`UserWarning`, once per draft/target pair) when
        the layouts fit but the draft was built for another model family: generation stays lossless, but few drafted
        tokens will be accepted.
        """
        built_for_type = self.config.target_model_type
        built_for_name = self.config.target_model_name_or_path
        if built_for_type:
            built_for = f"a {built_for_type!r} target" + (f" ({built_for_name})" if built_for_name else "")
        else:
            built_for = built_for_name or "an unknown target"
        target_type = target.config.model_type
        target_name = getattr(target, "name_or_path", "") or getattr(target.config, "_name_or_path", "") or ""
        used_with = f"a {target_type!r} target" + (f" ({target_name})" if target_name else "")
        problems = self.compatibility_problems(target)
        if problems:
            raise UserValueError(
                f"This SpecVLM draft (built for {built_for}) does not match the target, {used_with}: "
                + "; ".join(problems) + ". "
                "Build a draft for this target with `SpecVLMDraftModel.from_target(target)` and train it."
            )
        bad = self.non_finite_parameters()
        if bad:
            raise UserValueError(
                f"This SpecVLM draft (built for {built_for}) has non-finite values in {_describe_non_finite(bad)}; its "
                "weights were corrupted in memory or training diverged: reload the draft, retrain or load an earlier "
                "checkpoint."
            )
        # from_target records the target's top-level model_type; a draft built for the language model of a VLM's own
        # text family (e.g. 'llama' under 'llava') is the same family
        if built_for_type and built_for_type not in {target_type, target.config.get_text_config().model_type}:
            # stacklevel=1: one warning location, so the default filter shows each draft/target pair's message once
            warnings.warn(
                f"this draft was built for {built_for} but is used with {used_with}; the layouts fit, so generation "
                "stays correct, but a draft trained on another model's features will have few of its tokens "
                "accepted: build and train a draft for this target with `SpecVLMDraftModel.from_target(target)`.",
                UserWarning,
                stacklevel=1,
            )


__all__ = [
    "default_draft_vocab_ids",
    "resolve_draft_vocab_size",
    "special_token_ids",
    "SpecVLMDraftModel",
    "SpecVLMDraftPreTrainedModel",
    "SpecVLMDraftOutput",
    "SpecVLMDraftConfig",
    "DRAFT_MARKER",
    "compressor_config_for_draft",
    "compressor_config_to_dict",
]

# When this file is loaded as remote code and the library is installed, route generate() through the tree loop.
try:  # pragma: no cover - exercised in a subprocess test
    import specvlm_hf as _specvlm_hf
except ImportError:  # pragma: no cover
    _specvlm_hf = None
if _specvlm_hf is not None and hasattr(_specvlm_hf, "install_generate_route"):  # absent while the package initialises
    _specvlm_hf.install_generate_route()
