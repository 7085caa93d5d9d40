# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SpecVLM's elastic visual compressor (arXiv 2509.11815, §3.4, Fig. 4) as a standalone `PreTrainedModel`.

It sits between the draft's fusion (`SpecVLMDraftModel.fuse`: `fc([emb(x_{t+1}); f_t])` + input norm) and the draft's
decoder layer(s), and replaces every image span of the fused prefill sequence by a few tokens::

    fused (B, L, H) --[per image span: prune | pool | conv | resampler | text-only]--> fused (B, L', H), L' <= L
                     ^ question-aware gate on the target's features at the question positions

The target is never compressed, so decoding stays lossless whatever the compressor does; it only changes the draft's
prefill cost, its KV size and its acceptance rate.

**Position rule.** Every output token has a *source index* `s` into the input's sequence axis, returned as
`kept_index`, and takes the input position `position_ids[s]`:

- a text token is its own source (`s = t`);
- a pooled / convolved token's source is the **last** token of its window in raster order (the bottom-right patch of
  a 2-D window), so its position is never earlier than any token it summarises;
- a pruned token's source is the kept token itself (in `"weighted"` mode, where pruning is stratified to the pooling
  windows, the window's last token, like pooling and convolution);
- the `q` resampler tokens of an image take the image's **last `q` positions** (as ViSpec's adaptor does).

Tokens are emitted in order of their source index (stably, so `"concat"` keeps `primitives` order among ties), hence
positions are non-decreasing, strictly increasing in `"select"` and `"weighted"` modes, every text token keeps its
original position and the text after an image continues exactly where the uncompressed sequence would. The draft's
prediction at an output token is aligned with the target's next-token data of `kept_index` (`f_{s+1}`, `x_{s+2}`).

This file imports only `torch`, `transformers` and its sibling configuration, so it travels with a checkpoint through
`auto_map`.
"""

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput

from .configuration_elastic_compressor import ElasticCompressorConfig, window_shape


GridSizes = list[list[tuple[int, int] | None] | None] | None


@dataclass
class CompressorOutput(ModelOutput):
    r"""
    Output of [`ElasticVisualCompressor.forward`]. `L'` is the longest compressed row; rows are packed on the side given
    by `padding_side` (right by default).

    Args:
        fused (`torch.FloatTensor` of shape `(batch_size, L', hidden_size)`):
            Compressed fused inputs: text tokens in order, each image span replaced in place by its compressed tokens;
            zeros at padding. Feed it to the draft as `fused_inputs`.
        position_ids (`torch.LongTensor` of shape `(batch_size, L')`):
            `position_ids[kept_index]` (see the module docstring for the rule); 1 at padding.
        attention_mask (`torch.LongTensor` of shape `(batch_size, L')`):
            1 for real tokens, 0 for row padding.
        kept_index (`torch.LongTensor` of shape `(batch_size, L')`):
            For every output token, the index along the input sequence whose prediction it carries (text: itself;
            compressed visual token: the source index of the rule above); -1 at padding. Gather the trainer's
            targets with it, e.g. `target_features[b, kept_index[b] + 1]`.
        choice (`torch.LongTensor` of shape `(batch_size,)`):
            Index into `config.primitives` of the primitive each row used (`"select"`), of the largest gate weight
            (`"weighted"`), or -1 (`"concat"`, no gate).
        gate_logits (`torch.FloatTensor` of shape `(batch_size, n_options)`):
            Gate logits, float32; `n_options = len(config.primitives)`, 0 in `"concat"` mode.
        gate_probs (`torch.FloatTensor` of shape `(batch_size, n_options)`):
            `softmax(gate_logits)` without Gumbel noise: the weights of `"weighted"` mode, the expected choice of
            `"select"` mode.
        expected_kept_fraction (`torch.FloatTensor` of shape `(batch_size,)`):
            Differentiable `sum_o gate_probs[o] * kept_tokens(o) / visual_tokens` (0 for rows without images). Add
            `config.token_cost * expected_kept_fraction.mean()` to the training loss to charge the gate for tokens.
        n_visual_in (`torch.LongTensor` of shape `(batch_size,)`):
            Visual positions per row before compression.
        n_visual_out (`torch.LongTensor` of shape `(batch_size,)`):
            Compressed visual tokens per row.
    """

    fused: torch.FloatTensor | None = None
    position_ids: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    kept_index: torch.LongTensor | None = None
    choice: torch.LongTensor | None = None
    gate_logits: torch.FloatTensor | None = None
    gate_probs: torch.FloatTensor | None = None
    expected_kept_fraction: torch.FloatTensor | None = None
    n_visual_in: torch.LongTensor | None = None
    n_visual_out: torch.LongTensor | None = None


@dataclass(frozen=True)
class _ImageSpan:
    """One image of one row: input positions `start .. start + length - 1`, optional `(rows, cols)` patch grid."""

    index: int
    start: int
    length: int
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class _Windows:
    """
    Partition of an image span into windows of `window = (rows, cols)` tokens over the layout `grid = (h, w)`
    (`(1, n)` in 1-D). Edge windows may be partial; every span has at least one window.
    """

    grid: tuple[int, int]
    window: tuple[int, int]

    @classmethod
    def of(cls, length: int, grid: tuple[int, int] | None, ratio: int) -> "_Windows":
        if grid is None:
            return cls((1, length), window_shape(ratio, two_d=False))
        return cls(grid, window_shape(ratio, two_d=True))

    @property
    def out_grid(self) -> tuple[int, int]:
        (h, w), (sh, sw) = self.grid, self.window
        return -(-h // sh), -(-w // sw)

    @property
    def count(self) -> int:
        oh, ow = self.out_grid
        return oh * ow

    def _extents(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        (h, w), (sh, sw) = self.grid, self.window
        oh, ow = self.out_grid
        row0 = torch.arange(oh, device=device) * sh
        col0 = torch.arange(ow, device=device) * sw
        return row0, (h - row0).clamp(max=sh), col0, (w - col0).clamp(max=sw)

    def sizes(self, device: torch.device) -> torch.Tensor:
        """`(count,)` number of real tokens in each window (raster order of windows)."""
        _, rows, _, cols = self._extents(device)
        return (rows[:, None] * cols[None, :]).flatten()

    def last(self, device: torch.device) -> torch.Tensor:
        """`(count,)` in-span index of each window's last token in raster order (its bottom-right patch)."""
        row0, rows, col0, cols = self._extents(device)
        return ((row0 + rows - 1)[:, None] * self.grid[1] + (col0 + cols - 1)[None, :]).flatten()

    def membership(self, device: torch.device) -> torch.Tensor:
        """`(length,)` window id of every token of the span."""
        (h, w), (sh, sw) = self.grid, self.window
        t = torch.arange(h * w, device=device)
        return (t // w // sh) * self.out_grid[1] + (t % w) // sw

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """`(length, H)` -> zero-padded `(1, H, oh * sh, ow * sw)`."""
        (h, w), (sh, sw) = self.grid, self.window
        oh, ow = self.out_grid
        image = x.t().reshape(1, x.shape[-1], h, w)
        return F.pad(image, (0, ow * sw - w, 0, oh * sh - h))


# ----------------------------------------------------------------------------------------------------------------
# primitives: each maps one image span `x` of shape (length, H) to `(tokens (K, H), source (K,))`, source = in-span
# index whose position the token takes
# ----------------------------------------------------------------------------------------------------------------
class ElasticPrune(nn.Module):
    """
    Token pruning: keeps one token per window of the ratio's partition (`ceil(n / ratio)` in 1-D), no parameters.

    Strategies (`config.prune_strategy`): `"random"` (paper), `"stride"` (each window's last token),
    `"saliency_norm"` / `"saliency_question"` (largest `scores`). `stratified=True` picks one token per window
    (weighted mode); otherwise random / saliency pick freely among the whole span.
    """

    def forward(
        self,
        x: torch.Tensor,
        windows: _Windows,
        strategy: str,
        stratified: bool,
        scores: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = x.device
        length = x.shape[0]
        count = windows.count
        last = windows.last(device)
        if strategy == "stride":
            return x[last], last
        if strategy == "random":
            gen_device = generator.device if generator is not None else torch.device("cpu")
            keys = torch.rand(length, generator=generator, device=gen_device).to(device)
        else:
            if scores is None:
                raise ValueError(f"prune_strategy={strategy!r} needs saliency scores (pass `gate_features`).")
            keys = scores.to(device=device, dtype=torch.float32)
        if stratified:
            order = torch.argsort(keys, descending=True, stable=True)
            order = order[torch.argsort(windows.membership(device)[order], stable=True)]
            sizes = windows.sizes(device)
            kept = order[torch.cumsum(sizes, 0) - sizes]
            return x[kept], last
        kept = torch.topk(keys, count).indices.sort().values
        return x[kept], kept


class ElasticPool(nn.Module):
    """Average pooling over the windows of the ratio's partition (partial edge windows average their own tokens)."""

    def forward(self, x: torch.Tensor, windows: _Windows) -> tuple[torch.Tensor, torch.Tensor]:
        (sh, sw), (oh, ow) = windows.window, windows.out_grid
        hidden = x.shape[-1]
        sums = windows.to_image(x).reshape(hidden, oh, sh, ow, sw).sum(dim=(2, 4)).reshape(hidden, oh * ow).t()
        sizes = windows.sizes(x.device).to(x.dtype)
        return sums / sizes[:, None], windows.last(x.device)


class ElasticConv(nn.Module):
    """
    Learned strided convolution, kernel = stride = `ratio` tokens, stored as `nn.Conv1d(H, H, ratio, stride=ratio)`.

    On a 2-D grid the same kernel is applied as a `(rows, cols)` window ([`window_shape`]), tap `k` reading the
    window's `k`-th token in raster order, so one set of weights serves 1-D spans and 2-D grids. Partial edge windows
    are zero-padded and renormalised as in partial convolution (`W * x * ratio / n_real + b`). It is initialised to
    `1 / ratio` on every tap's diagonal and a zero bias, so an untrained convolution equals [`ElasticPool`] exactly.
    """

    def __init__(self, hidden_size: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size=ratio, stride=ratio, bias=True)

    def forward(self, x: torch.Tensor, windows: _Windows) -> tuple[torch.Tensor, torch.Tensor]:
        (sh, sw), (oh, ow) = windows.window, windows.out_grid
        if sh * sw != self.ratio:
            raise ValueError(f"window {windows.window} does not hold the convolution's {self.ratio} taps")
        hidden = x.shape[-1]
        weight = self.conv.weight.view(hidden, hidden, sh, sw)
        out = F.conv2d(windows.to_image(x.to(weight.dtype)), weight, stride=(sh, sw)).reshape(hidden, oh * ow).t()
        scale = self.ratio / windows.sizes(x.device).to(out.dtype)
        return out * scale[:, None] + self.conv.bias, windows.last(x.device)


class ElasticResampler(nn.Module):
    """
    Simplified one-layer Q-Former: `num_queries` learned queries cross-attend (multi-head, non-causal) over the span;
    outputs `min(num_queries, length)` tokens that take the span's last positions.

    Initialised with a zero query projection and identity value/output projections, so an untrained resampler returns
    the span's mean for every query; training breaks the symmetry through the distinct learned queries.
    """

    def __init__(self, hidden_size: int, num_queries: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.empty(num_queries, hidden_size))
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length, hidden = x.shape
        count = min(self.queries.shape[0], length)
        heads, head_dim = self.num_heads, hidden // self.num_heads
        x = x.to(self.k_proj.weight.dtype)
        q = self.q_proj(self.queries[:count]).view(count, heads, head_dim).transpose(0, 1)
        k = self.k_proj(x).view(length, heads, head_dim).transpose(0, 1)
        v = self.v_proj(x).view(length, heads, head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        out = self.o_proj(out.transpose(0, 1).reshape(count, hidden))
        return out, torch.arange(length - count, length, device=x.device)


class ElasticTextOnly(nn.Module):
    """Drops the whole image span (the draft then sees the question only)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:0], torch.zeros(0, dtype=torch.long, device=x.device)


class ElasticGate(nn.Module):
    """Question-aware gate: `LayerNorm -> Linear -> GELU -> Linear` over mean-pooled target features -> logits."""

    def __init__(self, input_size: int, hidden_size: int, num_options: int):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, num_options)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(pooled.to(self.fc1.weight.dtype)))))


class ElasticVisualCompressorPreTrainedModel(PreTrainedModel):
    """Base class: configuration class and weight initialisation."""

    config: ElasticCompressorConfig
    config_class = ElasticCompressorConfig
    base_model_prefix = "compressor"
    main_input_name = "fused"
    _no_split_modules = []

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only modules that own parameters directly reach this method (transformers skips parameter-less wrappers
        # in custom code), so the convolution is initialised at the `nn.Conv1d` level.
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):  # ElasticConv: average pooling
            average = torch.zeros_like(module.weight)
            average.diagonal(dim1=0, dim2=1).fill_(1.0 / module.kernel_size[0])
            init.copy_(module.weight, average)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ElasticResampler):
            init.normal_(module.queries, mean=0.0, std=1.0)
            init.zeros_(module.q_proj.weight)
            init.normal_(module.k_proj.weight, mean=0.0, std=std)
            init.eye_(module.v_proj.weight)
            init.eye_(module.o_proj.weight)
        elif isinstance(module, nn.Linear):  # the gate (resampler projections are overridden above, parents last)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ElasticVisualCompressor(ElasticVisualCompressorPreTrainedModel):
    r"""
    SpecVLM's elastic visual compressor for the draft's prefill (paper §3.4). See the module docstring for the
    position rule and [`ElasticCompressorConfig`] for every knob.

    Modes:
    - `"select"`: the gate picks one primitive per row. In training, a straight-through Gumbel-softmax sample
      (temperature `config.gumbel_temperature`) picks it and the chosen primitive's tokens are multiplied by the
      sample's straight-through weight (exactly 1 in the forward pass, the soft probability's gradient in the backward
      pass): branches output different token counts, so this scaling is how the task loss reaches the gate. A
      `"text_only"` choice emits no tokens, so such a row sends the gate only the `token_cost` gradient. At inference
      the choice is the argmax of the logits (deterministic) and nothing is scaled.
    - `"weighted"`: `sum_p softmax(logits)_p * primitive_p(span)` over prune / pool / conv at `weighted_ratio`; all
      three produce the same windows, tokens and positions.
    - `"concat"`: every primitive's tokens, merged in source order; no gate.

    Example:

    ```python
    >>> import torch
    >>> from specvlm_hf.models.configuration_elastic_compressor import ElasticCompressorConfig
    >>> from specvlm_hf.models.modeling_elastic_compressor import ElasticVisualCompressor

    >>> compressor = ElasticVisualCompressor(ElasticCompressorConfig(hidden_size=32, gate_hidden_size=16)).eval()
    >>> visual = torch.zeros(1, 50, dtype=torch.bool)
    >>> visual[0, 5:45] = True  # one image of 40 tokens
    >>> out = compressor(torch.randn(1, 50, 32), visual, gate_features=torch.randn(1, 50, 32), force_primitive="pool")
    >>> out.fused.shape, out.n_visual_out.tolist()  # 10 text tokens + ceil(40 / 20) pooled tokens
    (torch.Size([1, 12, 32]), [2])
    ```
    """

    def __init__(self, config: ElasticCompressorConfig):
        super().__init__(config)
        branches: dict[str, nn.Module] = {}
        for name in config.primitives:
            if name == "prune":
                branches[name] = ElasticPrune()
            elif name == "pool":
                branches[name] = ElasticPool()
            elif name == "conv":
                branches[name] = ElasticConv(config.hidden_size, config.ratio_for("conv"))
            elif name == "resampler":
                branches[name] = ElasticResampler(
                    config.hidden_size, config.resampler_queries, config.resampler_num_heads
                )
            else:
                branches[name] = ElasticTextOnly()
        self.branches = nn.ModuleDict(branches)
        self.gate = (
            ElasticGate(config.gate_input_size, config.gate_hidden_size, len(config.primitives))
            if config.uses_gate
            else None
        )
        self._train_generator: torch.Generator | None = None
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # token accounting
    # ------------------------------------------------------------------------------------------------------------
    def num_output_tokens(self, primitive: str, span_length: int, grid: tuple[int, int] | None = None) -> int:
        """
        Tokens `primitive` emits for one image of `span_length` tokens (with its `(rows, cols)` grid when 2-D).

        prune / pool / conv: number of windows of the ratio's partition, `ceil(n / r)` in 1-D and
        `ceil(rows / wr) * ceil(cols / wc)` on a grid with `wr * wc = r` ([`window_shape`]); resampler:
        `min(resampler_queries, n)`; text_only: 0. Every non-text-only primitive keeps at least one token per image.
        """
        if span_length <= 0 or primitive == "text_only":
            return 0
        if primitive == "resampler":
            return min(self.config.resampler_queries, span_length)
        grid = grid if self.config.grid_mode == "auto" else None
        return _Windows.of(span_length, grid, self.config.ratio_for(primitive)).count

    # ------------------------------------------------------------------------------------------------------------
    # input parsing
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _find_spans(
        visual: torch.Tensor, image_ids: torch.Tensor | None, grid_sizes: GridSizes
    ) -> list[list[_ImageSpan]]:
        """Contiguous image spans of every row, with their grids (validated against the span lengths)."""
        spans: list[list[_ImageSpan]] = []
        for row in range(visual.shape[0]):
            positions = visual[row].nonzero().flatten().tolist()
            if image_ids is None:
                ids = []
                run = -1
                for i, t in enumerate(positions):
                    if i == 0 or t != positions[i - 1] + 1:
                        run += 1
                    ids.append(run)
            else:
                ids = image_ids[row][visual[row]].tolist()
                if any(i < 0 for i in ids):
                    raise ValueError(f"row {row}: visual positions must carry an image id >= 0 in `image_ids`.")
            members: dict[int, list[int]] = {}
            for image, t in zip(ids, positions):
                members.setdefault(image, []).append(t)
            row_grids = grid_sizes[row] if grid_sizes is not None else None
            row_spans = []
            for image, where in members.items():
                start, length = where[0], len(where)
                if where[-1] - start + 1 != length:
                    raise ValueError(
                        f"row {row}: image {image} covers non-contiguous positions {start}..{where[-1]}; every image "
                        "must be one contiguous span of visual positions."
                    )
                grid = None
                if row_grids is not None:
                    if image >= len(row_grids):
                        raise ValueError(f"row {row}: grid_sizes has no entry for image {image}.")
                    grid = row_grids[image]
                if grid is not None:
                    grid = (int(grid[0]), int(grid[1]))
                    if grid[0] * grid[1] != length:
                        raise ValueError(
                            f"row {row}: image {image} spans {length} positions but grid_sizes gives {grid} = "
                            f"{grid[0] * grid[1]} patches; pass None for images that are not a plain raster grid "
                            "(e.g. with newline tokens) to compress them along the sequence."
                        )
                row_spans.append(_ImageSpan(image, start, length, grid))
            spans.append(sorted(row_spans, key=lambda span: span.start))
        return spans

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if self._train_generator is None:
            self._train_generator = torch.Generator().manual_seed(self.config.seed)
        return self._train_generator

    def _prune_generator(self, generator: torch.Generator | None, span: _ImageSpan) -> torch.Generator:
        """Caller's generator, else the advancing training generator, else (eval) a fresh one per image."""
        if generator is not None or self.training:
            return self._generator(generator)
        seed = (self.config.seed * 1_000_003 + span.length * 7_919 + span.index) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def _saliency(strategy: str, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Per-token saliency of one span from its target features `(n, D)` and the question features `(q, D)`."""
        features = features.float()
        if strategy == "saliency_question" and question.shape[0] > 0:
            scores = question.float() @ features.t() / math.sqrt(features.shape[-1])
            return scores.softmax(dim=-1).mean(dim=0)
        return features.norm(dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def _run_primitive(
        self,
        name: str,
        x: torch.Tensor,
        span: _ImageSpan,
        *,
        stratified: bool,
        span_features: torch.Tensor | None,
        question: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.branches[name]
        if name == "text_only" or name == "resampler":
            return module(x)
        grid = span.grid if self.config.grid_mode == "auto" else None
        windows = _Windows.of(span.length, grid, self.config.ratio_for(name))
        if name != "prune":
            return module(x, windows)
        strategy = self.config.prune_strategy
        scores = None
        if strategy.startswith("saliency"):
            if span_features is None:
                raise ValueError(f"prune_strategy={strategy!r} needs `gate_features`.")
            scores = self._saliency(strategy, span_features, question)
        prune_generator = self._prune_generator(generator, span) if strategy == "random" else None
        return module(x, windows, strategy, stratified, scores=scores, generator=prune_generator)

    def forward(
        self,
        fused: torch.Tensor,
        visual_mask: torch.Tensor,
        image_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        gate_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        grid_sizes: GridSizes = None,
        attention_mask: torch.Tensor | None = None,
        force_primitive: str | None = None,
        generator: torch.Generator | None = None,
        padding_side: str = "right",
    ) -> CompressorOutput:
        r"""
        Args:
            fused (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`):
                The draft's fused inputs over its prefill positions (`draft.fuse(...)`: position `t` pairs
                `emb(x_{t+1})` with `f_t`).
            visual_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`):
                Positions whose paired token `x_{t+1}` is visual.
            image_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Image index (0..n_images-1 within the row) of every visual position, -1 elsewhere. Each image must be
                one contiguous span. Default: every maximal run of visual positions is its own image.
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                1-D positions of the inputs. Defaults to `arange(seq_len)`.
            gate_features (`torch.FloatTensor` of shape `(batch_size, seq_len, gate_input_size)`, *optional*):
                The target's uncompressed features `f_t`. Required by the gate (`"select"`, `"weighted"`) and by
                saliency pruning.
            text_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*):
                Question / text positions whose features are mean-pooled into the gate input (and attend in
                `"saliency_question"` pruning). Defaults to every non-visual real position; a row without any falls
                back to all its real positions.
            grid_sizes (`list[list[tuple[int, int] | None] | None]`, *optional*):
                Per row, per image id, the `(rows, cols)` patch grid in raster order, or `None` for sequence
                (1-D) compression of that image / row. `rows * cols` must equal the image's span length.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
                1 for real positions, 0 for padding (either side). Defaults to all ones.
            force_primitive (`str`, *optional*):
                `"select"` mode only: use this primitive for every row instead of the gate's choice (ablations such as
                the paper's Table 4). The gate still runs (logits and probabilities are reported) but receives no
                gradient through the tokens.
            generator (`torch.Generator`, *optional*):
                Source of the Gumbel noise and random pruning. Default: a generator seeded once from `config.seed`
                in training; at inference the gate is noise-free and every image prunes with a fresh generator
                seeded from `config.seed`, its length and its index, so results are reproducible.
            padding_side (`str`, *optional*, defaults to `"right"`):
                Side on which compressed rows are padded to a common length.

        Returns:
            [`CompressorOutput`]
        """
        config = self.config
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left' (got {padding_side!r})")
        if fused.dim() != 3 or fused.shape[-1] != config.hidden_size:
            raise ValueError(
                f"fused must have shape (batch, seq_len, {config.hidden_size}); got {tuple(fused.shape)}."
            )
        batch, seq_len, _ = fused.shape
        device = fused.device
        if visual_mask.shape != (batch, seq_len):
            raise ValueError(f"visual_mask must have shape {(batch, seq_len)}; got {tuple(visual_mask.shape)}.")
        valid = (
            torch.ones(batch, seq_len, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.to(device).bool()
        )
        visual = visual_mask.to(device).bool() & valid
        text = (~visual & valid) if text_mask is None else (text_mask.to(device).bool() & valid & ~visual)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device)[None].expand(batch, -1)
        spans = self._find_spans(visual, image_ids.to(device) if image_ids is not None else None, grid_sizes)
        names = list(config.primitives)
        if force_primitive is not None:
            if config.mode != "select":
                raise ValueError(f"force_primitive is only meaningful in mode='select' (mode is {config.mode!r}).")
            if force_primitive not in names:
                raise ValueError(f"force_primitive={force_primitive!r} is not one of the configured primitives {names}")

        needs_features = config.uses_gate or (config.prune_strategy.startswith("saliency") and "prune" in names)
        if needs_features and gate_features is None:
            raise ValueError(
                f"mode={config.mode!r} with prune_strategy={config.prune_strategy!r} needs `gate_features` "
                "(the target's uncompressed features)."
            )
        if gate_features is not None and gate_features.shape[:2] != (batch, seq_len):
            raise ValueError(f"gate_features must have shape ({batch}, {seq_len}, D); got {tuple(gate_features.shape)}")

        # ---- gate ---------------------------------------------------------------------------------------------
        n_options = len(names) if self.gate is not None else 0
        gate_logits = torch.zeros(batch, n_options, device=device)
        straight_through = None
        choice = torch.full((batch,), -1, dtype=torch.long, device=device)
        if self.gate is not None:
            if gate_features.shape[-1] != config.gate_input_size:
                raise ValueError(
                    f"gate_features width {gate_features.shape[-1]} != config.gate_input_size {config.gate_input_size}."
                )
            pool_mask = torch.where(text.any(dim=-1, keepdim=True), text, valid).to(torch.float32)
            pooled = (gate_features.float() * pool_mask[..., None]).sum(1) / pool_mask.sum(1).clamp_min(1)[:, None]
            gate_logits = self.gate(pooled).float()
            if config.mode == "select":
                if force_primitive is not None:
                    choice = torch.full((batch,), names.index(force_primitive), dtype=torch.long, device=device)
                elif self.training:
                    straight_through, choice = _straight_through_gumbel(
                        gate_logits, config.gumbel_temperature, self._generator(generator)
                    )
                else:
                    choice = gate_logits.argmax(dim=-1)
        gate_probs = gate_logits.softmax(dim=-1)
        if config.mode == "weighted":
            choice = gate_probs.argmax(dim=-1)

        # ---- per-row assembly ---------------------------------------------------------------------------------
        rows_tokens, rows_source = [], []
        n_visual_out = []
        kept_per_option = torch.zeros(batch, max(n_options, 1), dtype=torch.float32, device=device)
        for row in range(batch):
            text_index = (valid[row] & ~visual[row]).nonzero().flatten()
            pieces, sources = [fused[row, text_index]], [text_index]
            question = gate_features[row, text[row]] if gate_features is not None else None
            visual_out = 0
            for span in spans[row]:
                x = fused[row, span.start : span.start + span.length]
                span_features = (
                    gate_features[row, span.start : span.start + span.length] if gate_features is not None else None
                )
                run = {
                    "stratified": config.mode == "weighted",
                    "span_features": span_features,
                    "question": question,
                    "generator": generator,
                }
                if config.mode == "select":
                    tokens, source = self._run_primitive(names[int(choice[row])], x, span, **run)
                    if straight_through is not None:
                        tokens = tokens * straight_through[row, choice[row]].to(tokens.dtype)
                elif config.mode == "weighted":
                    weights = gate_probs[row].to(fused.dtype)
                    outputs = [self._run_primitive(name, x, span, **run) for name in names]
                    tokens = sum(weights[i] * out[0].to(fused.dtype) for i, out in enumerate(outputs))
                    source = outputs[0][1]
                else:
                    outputs = [self._run_primitive(name, x, span, **run) for name in names]
                    tokens = torch.cat([out[0].to(fused.dtype) for out in outputs])
                    source = torch.cat([out[1] for out in outputs])
                pieces.append(tokens.to(fused.dtype))
                sources.append(source.to(device) + span.start)
                visual_out += tokens.shape[0]
                counts = [self.num_output_tokens(name, span.length, span.grid) for name in names]
                if n_options:  # tokens each option would keep
                    kept_per_option[row] += torch.tensor(counts, dtype=torch.float32, device=device)
                else:  # concat keeps all of them
                    kept_per_option[row, 0] += sum(counts)
            row_tokens, row_source = torch.cat(pieces), torch.cat(sources)
            order = torch.argsort(row_source, stable=True)
            rows_tokens.append(row_tokens[order])
            rows_source.append(row_source[order])
            n_visual_out.append(visual_out)

        # ---- padding ------------------------------------------------------------------------------------------
        out_len = max(tokens.shape[0] for tokens in rows_tokens)
        out_fused, out_source, out_mask = [], [], []
        for row_tokens, row_source in zip(rows_tokens, rows_source):
            pad = out_len - row_tokens.shape[0]
            before, after = (0, pad) if padding_side == "right" else (pad, 0)
            out_fused.append(F.pad(row_tokens, (0, 0, before, after)))
            out_source.append(F.pad(row_source, (before, after), value=-1))
            out_mask.append(F.pad(torch.ones_like(row_source), (before, after), value=0))
        kept_index = torch.stack(out_source)
        out_attention_mask = torch.stack(out_mask)
        out_positions = position_ids.to(device).gather(1, kept_index.clamp(min=0))
        out_positions = out_positions.masked_fill(out_attention_mask == 0, 1)

        n_visual_in = visual.sum(dim=-1)
        denominator = n_visual_in.to(torch.float32).clamp_min(1)[:, None]
        kept_fraction = kept_per_option / denominator
        if n_options:
            expected_kept_fraction = (gate_probs * kept_fraction).sum(dim=-1)
        else:
            expected_kept_fraction = kept_fraction[:, 0]
        return CompressorOutput(
            fused=torch.stack(out_fused),
            position_ids=out_positions,
            attention_mask=out_attention_mask,
            kept_index=kept_index,
            choice=choice,
            gate_logits=gate_logits,
            gate_probs=gate_probs,
            expected_kept_fraction=expected_kept_fraction,
            n_visual_in=n_visual_in,
            n_visual_out=torch.tensor(n_visual_out, dtype=torch.long, device=device),
        )


def _straight_through_gumbel(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Straight-through Gumbel-softmax: returns `(weights, index)` where `weights` is one-hot in the forward pass and
    carries the gradient of `softmax((logits + g) / temperature)` in the backward pass.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=generator.device, dtype=torch.float32)
    uniform = uniform.to(logits.device).clamp(min=1e-10, max=1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    soft = ((logits.float() + gumbel) / temperature).softmax(dim=-1)
    index = soft.argmax(dim=-1)
    hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft, index


__all__ = [
    "CompressorOutput",
    "ElasticCompressorConfig",
    "ElasticVisualCompressor",
    "ElasticVisualCompressorPreTrainedModel",
]
