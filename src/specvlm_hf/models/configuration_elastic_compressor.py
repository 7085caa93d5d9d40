# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of SpecVLM's elastic visual compressor (arXiv 2509.11815, §3.4, Fig. 4).

This file is self-contained (it imports only `transformers` and its `huggingface_hub` dependency) so that it can be
shipped next to a checkpoint through `auto_map` and loaded with `trust_remote_code=True`. It deliberately has no
`from __future__ import annotations`: `@strict` needs real annotations to type-check the fields.
"""

import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


#: Every primitive the compressor knows, in the order used when `primitives` is left to its default.
COMPRESSOR_PRIMITIVES = ("prune", "pool", "conv", "resampler", "text_only")

#: Default primitives per mode (paper §3.2: (c) selects among all five; (a) fuses prune/pool/conv at one ratio;
#: (b) concatenates prune 20x, pool 20x, conv 3x and a 2-query resampler).
DEFAULT_PRIMITIVES = {
    "select": ["prune", "pool", "conv", "resampler", "text_only"],
    "weighted": ["prune", "pool", "conv"],
    "concat": ["prune", "pool", "conv", "resampler"],
}

#: Primitives allowed in `weighted` mode: those that produce the same windows at the same ratio.
WEIGHTED_PRIMITIVES = ("prune", "pool", "conv")


def window_shape(ratio: int, two_d: bool) -> tuple[int, int]:
    """
    Window `(rows, cols)` of a window-based primitive (prune / pool / conv) at reduction `ratio`.

    In 1-D the window is `(1, ratio)`: `ratio` consecutive tokens. On a 2-D patch grid the ratio is factorised as
    `rows * cols == ratio` with `rows` the largest divisor of `ratio` not above `sqrt(ratio)` (20 -> 4x5, 16 -> 4x4,
    3 -> 1x3, 2 -> 1x2), so a full window always merges exactly `ratio` tokens, in 1-D as in 2-D.
    """
    if not two_d:
        return 1, ratio
    rows = max(d for d in range(1, math.isqrt(ratio) + 1) if ratio % d == 0)
    return rows, ratio // rows


@strict
class ElasticCompressorConfig(PreTrainedConfig):
    r"""
    Configuration of an [`ElasticVisualCompressor`]: the module that shortens the draft's prefill by compressing each
    image span of the draft's fused inputs (SpecVLM §3.4). It only ever touches the **draft**; the target always sees
    every visual token, so compression never affects losslessness, only acceptance and draft cost.

    Build it for a given draft with [`ElasticCompressorConfig.for_draft`], which copies the widths. The dictionary
    form (`config.to_dict()`) is what the draft stores in `SpecVLMDraftConfig.compressor_config`.

    Args:
        hidden_size (`int`, *optional*, defaults to 4096):
            Width of the draft's fused inputs (the draft's `hidden_size`); every compressed token has this width.
        gate_input_size (`int`, *optional*):
            Width of the target features that condition the gate (and the saliency scores). Defaults to `hidden_size`.
        mode (`str`, *optional*, defaults to `"select"`):
            How the primitives are combined (paper §3.2):
            - `"select"` (paper default, mode (c)): a question-aware gate picks **one** primitive per prompt;
              straight-through Gumbel-softmax in training, argmax at inference (deterministic).
            - `"weighted"` (mode (a)): gate-weighted sum of prune / pool / conv run at the same ratio `weighted_ratio`,
              so they produce the same windows and the same number of tokens.
            - `"concat"` (mode (b)): every primitive's output is kept (multi-granularity); no gate.
        primitives (`list[str]`, *optional*):
            Primitives used, from `"prune"`, `"pool"`, `"conv"`, `"resampler"`, `"text_only"`. Their order is the
            order of the gate's logits and of `choice`. Defaults to all five for `"select"`,
            `["prune", "pool", "conv"]` for `"weighted"` and `["prune", "pool", "conv", "resampler"]` for `"concat"`.
        prune_ratio (`int`, *optional*, defaults to 20):
            Pruning keeps one token per `prune_ratio` visual tokens (at least one per image).
        pool_ratio (`int`, *optional*, defaults to 20):
            Average pooling merges windows of `pool_ratio` tokens (see [`window_shape`] for 2-D grids).
        conv_ratio (`int`, *optional*, defaults to 3):
            Kernel = stride of the learned convolution, in tokens per output token.
        resampler_queries (`int`, *optional*, defaults to 2):
            Learned queries of the one-layer cross-attention resampler = tokens it outputs per image (fewer when an
            image has fewer tokens than queries).
        resampler_num_heads (`int`, *optional*):
            Attention heads of the resampler. Defaults to `hidden_size // 128` when that divides `hidden_size`,
            else 1.
        weighted_ratio (`int`, *optional*, defaults to 3):
            Common ratio of prune / pool / conv in `"weighted"` mode (the paper uses <= 5x, 3x by default). The
            per-primitive ratios are ignored in that mode.
        prune_strategy (`str`, *optional*, defaults to `"random"`):
            Which tokens pruning keeps:
            - `"random"`: a random subset (paper). Seeded: at inference every image draws from a fresh generator
              seeded from `seed` and the image's size and index, so the same prompt always keeps the same tokens; in
              training a generator seeded once from `seed` advances from call to call.
            - `"stride"`: deterministically the last token of every window.
            - `"saliency_norm"`: the tokens whose target feature has the largest L2 norm.
            - `"saliency_question"`: the tokens the question attends to most (softmax over the image's tokens of
              scaled dot products with the question-token features, averaged over question tokens).
            In `"weighted"` mode pruning is stratified (one token per window, chosen by the same rule) so that its
            tokens line up with the pooling and convolution windows.
        seed (`int`, *optional*, defaults to 0):
            Seed of the pruning and Gumbel generators.
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the straight-through Gumbel-softmax of `"select"` mode in training (the paper gives none).
            The forward reads it on every call, so a trainer callback may anneal it by assigning the field.
        gate_hidden_size (`int`, *optional*, defaults to 256):
            Hidden width of the gate MLP (`LayerNorm -> Linear -> GELU -> Linear`).
        token_cost (`float`, *optional*, defaults to 0.0):
            Beyond the paper (which has no cost term). Weight a trainer should give to the output's differentiable
            `expected_kept_fraction`: `loss = task_loss + token_cost * expected_kept_fraction.mean()`. The compressor
            only stores it; `0.0` reproduces the paper.
        grid_mode (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: pool, convolve and stratify on the 2-D patch grid of an image when the caller passes its
            `(rows, cols)`, along the sequence otherwise. `"1d"`: always along the sequence.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the gate and the resampler's key projection.

    Example:

    ```python
    >>> from specvlm_hf.models.configuration_elastic_compressor import ElasticCompressorConfig

    >>> config = ElasticCompressorConfig(hidden_size=4096)  # paper default: select among 5 primitives
    >>> config.primitives
    ['prune', 'pool', 'conv', 'resampler', 'text_only']
    >>> ElasticCompressorConfig(hidden_size=4096, mode="weighted").ratio_for("conv")
    3
    ```
    """

    model_type = "specvlm_elastic_compressor"

    hidden_size: int = 4096
    gate_input_size: int | None = None
    mode: Literal["select", "weighted", "concat"] = "select"
    primitives: list[str] | None = None
    prune_ratio: int = 20
    pool_ratio: int = 20
    conv_ratio: int = 3
    resampler_queries: int = 2
    resampler_num_heads: int | None = None
    weighted_ratio: int = 3
    prune_strategy: Literal["random", "stride", "saliency_norm", "saliency_question"] = "random"
    seed: int = 0
    gumbel_temperature: float | int = 1.0
    gate_hidden_size: int = 256
    token_cost: float | int = 0.0
    grid_mode: Literal["auto", "1d"] = "auto"
    initializer_range: float | int = 0.02

    def __post_init__(self, **kwargs: Any):
        if self.gate_input_size is None:
            self.gate_input_size = self.hidden_size
        if self.primitives is None:
            self.primitives = list(DEFAULT_PRIMITIVES.get(self.mode, DEFAULT_PRIMITIVES["select"]))
        else:
            self.primitives = [str(name) for name in self.primitives]
        self.gumbel_temperature = float(self.gumbel_temperature)
        self.token_cost = float(self.token_cost)
        self.initializer_range = float(self.initializer_range)
        if self.resampler_num_heads is None:
            self.resampler_num_heads = self.hidden_size // 128 if self.hidden_size % 128 == 0 else 1
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field checks (run by `@strict` on construction and on `from_pretrained`)."""
        super().validate_architecture()
        problems = []
        if self.hidden_size < 1:
            problems.append(f"hidden_size must be >= 1 (got {self.hidden_size})")
        if self.gate_input_size is not None and self.gate_input_size < 1:
            problems.append(f"gate_input_size must be >= 1 (got {self.gate_input_size})")
        names = list(self.primitives or [])
        unknown = [name for name in names if name not in COMPRESSOR_PRIMITIVES]
        if not names:
            problems.append(f"primitives must name at least one of {list(COMPRESSOR_PRIMITIVES)}")
        if unknown:
            problems.append(f"unknown primitives {unknown}; choose from {list(COMPRESSOR_PRIMITIVES)}")
        if len(set(names)) != len(names):
            problems.append(f"primitives must not repeat (got {names})")
        if self.mode == "weighted":
            bad = [name for name in names if name not in WEIGHTED_PRIMITIVES]
            if bad:
                problems.append(
                    f"mode='weighted' sums same-ratio token sequences, so it accepts only {list(WEIGHTED_PRIMITIVES)}; "
                    f"remove {bad} or use mode='select' / 'concat'"
                )
        if self.mode == "concat" and "text_only" in names:
            problems.append("mode='concat' keeps every branch, so 'text_only' adds nothing: remove it")
        for field_name in ("prune_ratio", "pool_ratio", "conv_ratio", "weighted_ratio", "resampler_queries"):
            if getattr(self, field_name) < 1:
                problems.append(f"{field_name} must be >= 1 (got {getattr(self, field_name)})")
        if self.resampler_num_heads is not None and (
            self.resampler_num_heads < 1 or self.hidden_size % self.resampler_num_heads != 0
        ):
            problems.append(
                f"resampler_num_heads ({self.resampler_num_heads}) must be >= 1 and divide hidden_size "
                f"({self.hidden_size})"
            )
        if not self.gumbel_temperature > 0:
            problems.append(f"gumbel_temperature must be > 0 (got {self.gumbel_temperature})")
        if self.gate_hidden_size < 1:
            problems.append(f"gate_hidden_size must be >= 1 (got {self.gate_hidden_size})")
        if not self.token_cost >= 0:
            problems.append(f"token_cost must be >= 0 (got {self.token_cost})")
        if problems:
            raise ValueError("Invalid ElasticCompressorConfig: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------
    @property
    def uses_gate(self) -> bool:
        """Whether the mode has a question-aware gate (`"select"` and `"weighted"`; `"concat"` has none)."""
        return self.mode in ("select", "weighted")

    def ratio_for(self, primitive: str) -> int:
        """Effective reduction ratio of a window-based primitive (`weighted_ratio` for all of them in weighted mode)."""
        if self.mode == "weighted":
            return self.weighted_ratio
        return {"prune": self.prune_ratio, "pool": self.pool_ratio, "conv": self.conv_ratio}[primitive]

    @classmethod
    def for_draft(cls, draft_config: Any, **overrides: Any) -> "ElasticCompressorConfig":
        """
        A compressor config shaped for a draft config (duck-typed, e.g. `SpecVLMDraftConfig`): `hidden_size` is the
        draft's width and `gate_input_size` the width of the draft's target features
        (`target_hidden_size * len(target_layer_ids)`). `overrides` sets any other field.
        """
        hidden = draft_config.hidden_size
        target_hidden = getattr(draft_config, "target_hidden_size", None) or hidden
        taps = len(getattr(draft_config, "target_layer_ids", None) or [-1])
        values: dict[str, Any] = {"hidden_size": hidden, "gate_input_size": target_hidden * taps}
        values.update(overrides)
        return cls(**values)


__all__ = [
    "ElasticCompressorConfig",
    "COMPRESSOR_PRIMITIVES",
    "DEFAULT_PRIMITIVES",
    "WEIGHTED_PRIMITIVES",
    "window_shape",
]
