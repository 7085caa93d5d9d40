"""Where the visual tokens of a prompt are, for the draft's visual compressor (shared by decoding and training).

The draft's position `t` reads the target feature of token `x_t` and the embedding of `x_{t+1}` (its *paired* token);
a position is visual when its paired token is an image/video placeholder. Runs of placeholders are located and, where
the family's layout gives one, each run's raster grid is recovered, so the compressor can pool or convolve in 2-D.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

#: Model types whose image placeholder runs are square raster grids of the image's tokens (one run per image or tile).
SQUARE_GRID_MODEL_TYPES = ("llava", "gemma3", "idefics3", "smolvlm")


def visual_token_ids(target: "PreTrainedModel") -> list[int]:
    """Placeholder ids of the target's visual tokens (image, and video where the family has one), from its config."""
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(target.config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def visual_runs(paired_ids: torch.Tensor, visual_ids: list[int]) -> list[tuple[int, int]]:
    """`(start, length)` of every maximal run of visual placeholders in `paired_ids`, in order."""
    runs: list[tuple[int, int]] = []
    previous_visual = False
    for index, token in enumerate(paired_ids.tolist()):
        visual = token in visual_ids
        if visual and previous_visual:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif visual:
            runs.append((index, 1))
        previous_visual = visual
    return runs


def raster_grid(positions: torch.Tensor) -> tuple[int, int] | None:
    """
    `(rows, cols)` when the mRoPE `(temporal, height, width)` positions `(3, n)` of a run walk one frame's grid in
    raster order (Qwen2-VL / Qwen2.5-VL images), else `None` (several video frames, any other layout).
    """
    temporal, height, width = positions.cpu()
    if not bool((temporal == temporal[0]).all()):
        return None
    rows, cols = int(height.max() - height.min()) + 1, int(width.max() - width.min()) + 1
    index = torch.arange(positions.shape[1])
    if rows * cols != index.numel():
        return None
    if torch.equal(height - height.min(), index // cols) and torch.equal(width - width.min(), index % cols):
        return rows, cols
    return None


def image_grids(
    model_type: str,
    paired_rows: list[torch.Tensor],
    visual_ids: list[int],
    paired_positions: list[torch.Tensor] | None = None,
) -> list[list[tuple[int, int] | None]]:
    """
    Per row of paired prompt tokens, per run of visual placeholders, the `(rows, cols)` raster grid of the run's
    tokens, or `None` where the layout is not a plain grid (LLaVA-NeXT's unpadded crops with newline tokens, videos, a
    run cut by the start of the prompt, unknown families), which the compressor then compresses along the sequence.

    Args:
        model_type (`str`): the target's `config.model_type`; its runs are square grids when it is one of
            `SQUARE_GRID_MODEL_TYPES` and the run length is a perfect square.
        paired_rows (`list[torch.LongTensor]`): per row, the prompt tokens `x_1 .. x_{L-1}`.
        visual_ids (`list[int]`): placeholder ids of visual tokens.
        paired_positions (`list[torch.LongTensor]`, *optional*): per row, the mRoPE `(temporal, height, width)`
            positions `(3, L-1)` of those tokens; when given, a run's grid is read from them.
    """
    grids = []
    for row, paired_ids in enumerate(paired_rows):
        row_grids: list[tuple[int, int] | None] = []
        for start, length in visual_runs(paired_ids, visual_ids):
            grid = None
            if paired_positions is not None:
                grid = raster_grid(paired_positions[row][:, start : start + length])
            elif model_type in SQUARE_GRID_MODEL_TYPES:
                side = math.isqrt(length)
                grid = (side, side) if side * side == length else None
            row_grids.append(grid)
        grids.append(row_grids)
    return grids


def paired_visual_mask(paired_ids: torch.Tensor, visual_ids: list[int]) -> torch.Tensor:
    """
    `(1, L)` mask of the draft prefill positions `t` whose paired token `x_{t+1}` is visual, from the paired prompt
    tokens `x_1 .. x_{L-1}`; the last position (paired with the first generated token) is never visual.
    """
    visual = torch.isin(paired_ids, torch.tensor(visual_ids, device=paired_ids.device))
    return torch.cat([visual, visual.new_zeros(1)])[None]


__all__ = ["SQUARE_GRID_MODEL_TYPES", "image_grids", "paired_visual_mask", "raster_grid", "visual_runs", "visual_token_ids"]
