"""The exactness audit of `specvlm bench` (issue #11): where and how closely outputs differ from plain `generate`.

At temperature 0 every batch of prompts first runs once, untimed, through plain `generate(..., output_logits=True,
return_dict_in_generate=True)` ([`PlainReference`]): its tokens are the reference every method's output is compared
with, its logits give the target's **margin** at each position (top-1 minus top-2 logit under plain decoding: how
nearly tied the greedy choice was), and its sequences are what the `oracle` method replays. [`find_divergences`] lists
each output row that is not token-identical to the reference, with the first differing token and the margin there; a
difference at a margin of a few hundredths is floating-point rounding, a difference at a large margin is a bug.

When the bench runs in reduced precision (bfloat16 / float16), [`measure_noise_floor`] also measures how often plain
decoding itself changes when only the arithmetic changes: the same prompts, plain greedy `generate` on a float32 copy
of the target (the same weights, upcast), compared with the reduced-precision reference. A speculative method whose
divergence rate is at or below that rate diverges no more than the choice of dtype does.

Example:

```python
>>> from specvlm_hf.bench.exactness import first_difference
>>> first_difference([5, 6, 7], [5, 6, 9]), first_difference([5, 6], [5, 6])
(2, None)
```
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "REDUCED_PRECISION",
    "PlainReference",
    "eos_token_ids",
    "find_divergences",
    "first_difference",
    "generated_rows",
    "measure_noise_floor",
    "top2_margins",
    "unpadded_prompts",
]

#: dtypes whose plain decoding is compared with a float32 copy of the target ([`measure_noise_floor`]).
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def eos_token_ids(model: Any) -> set[int]:
    """The end-of-sequence ids of `model.generation_config` (an empty set when it has none)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generated_rows(sequences: torch.Tensor, prompt_len: int, eos_ids: set[int]) -> list[list[int]]:
    """The generated tokens of each row of `sequences` `(batch, prompt_len + new)`, up to and including the first
    end-of-sequence token."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        for i, token in enumerate(row):
            if token in eos_ids:
                row = row[: i + 1]
                break
        rows.append(row)
    return rows


def unpadded_prompts(inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt tokens without the (left) padding, from `input_ids` and `attention_mask`."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        return ids.tolist()
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def top2_margins(logits: Sequence[torch.Tensor]) -> list[list[float]]:
    """
    Top-1 minus top-2 logit at every generated position.

    Args:
        logits (`Sequence[torch.Tensor]`): `generate(..., output_logits=True).logits`, one `(batch, vocab)` tensor per
            generated position.

    Returns:
        `list[list[float]]`: per row, one margin per position (computed in float32).
    """
    if not logits:
        return []
    per_step = []
    for step in logits:
        top = step.float().topk(2, dim=-1).values
        per_step.append(top[:, 0] - top[:, 1])
    return torch.stack(per_step, dim=1).tolist()


def first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first generated token where `tokens` and `reference` differ (the shorter length when one is a
    prefix of the other); `None` when they are identical."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


@dataclass
class PlainReference:
    """
    Plain greedy `generate` of one batch of prompts, with its logits reduced to margins.

    Args:
        rows (`list[list[int]]`): generated tokens per row, up to and including the first end-of-sequence token.
        margins (`list[list[float]]`): per row and generated position, the target's top-1 minus top-2 logit.
        prompts (`list[list[int]]`): per row, the prompt tokens without padding.
    """

    rows: list[list[int]]
    margins: list[list[float]]
    prompts: list[list[int]]

    @classmethod
    @torch.no_grad()
    def run(cls, model: Any, inputs: Mapping[str, torch.Tensor], max_new_tokens: int,
            eos_ids: set[int] | None = None) -> PlainReference:
        """Runs plain greedy `model.generate(**inputs, output_logits=True, return_dict_in_generate=True)`."""
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        eos_ids = eos_token_ids(model) if eos_ids is None else eos_ids
        return cls(generated_rows(out.sequences, inputs["input_ids"].shape[1], eos_ids), top2_margins(out.logits),
                   unpadded_prompts(inputs))

    @property
    def replay(self) -> list[list[int]]:
        """Per row, the unpadded prompt followed by the reference continuation: the `references` of
        `specvlm_hf.generation.drafters.ReplayDrafterFactory`."""
        return [prompt + row for prompt, row in zip(self.prompts, self.rows)]

    def margin(self, row: int, position: int) -> float | None:
        """The margin of `row` at generated `position` (`None` past the end of the reference)."""
        margins = self.margins[row] if row < len(self.margins) else []
        return float(margins[position]) if position < len(margins) else None


def find_divergences(
    calls: Iterable[tuple[int, Sequence[Sequence[int]]]],
    references: Mapping[int, PlainReference],
    batch_size: int,
) -> list[dict[str, Any]]:
    """
    The output rows that differ from the plain reference.

    Args:
        calls (`Iterable[tuple[int, Sequence[Sequence[int]]]]`): `(batch index, rows)` of every timed call of a
            method (several repetitions of a batch may be given).
        references (`Mapping[int, PlainReference]`): the plain reference of each batch index.
        batch_size (`int`): prompts per batch (prompt index = batch index * batch size + row).

    Returns:
        `list[dict]`, one entry per diverging (prompt, row), in prompt order: `prompt` (index in the prompts file),
        `row` (in its batch), `first_diff` (generated-token index), `margin` (the target's top-1 minus top-2 logit
        there under plain decoding; `None` past the reference's end) and `diverging_runs` (how many of that row's
        calls diverged; the first one's position is reported).
    """
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for unit, rows in calls:
        reference = references.get(unit)
        if reference is None:
            continue
        for row, (tokens, expected) in enumerate(zip(rows, reference.rows)):
            position = first_difference(tokens, expected)
            if position is None:
                continue
            entry = found.get((unit, row))
            if entry is not None:
                entry["diverging_runs"] += 1
                continue
            found[(unit, row)] = {"prompt": unit * batch_size + row, "row": row, "first_diff": position,
                                  "margin": reference.margin(row, position), "diverging_runs": 1}
    return [found[key] for key in sorted(found, key=lambda k: found[k]["prompt"])]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def measure_noise_floor(
    target: Any,
    inputs: Sequence[Mapping[str, torch.Tensor]],
    max_new_tokens: Sequence[int],
    references: Mapping[int, PlainReference],
    batch_size: int,
    num_prompts: int | None = None,
) -> dict[str, Any] | None:
    """
    How often plain greedy decoding in `target`'s reduced precision differs from plain decoding in float32.

    A float32 copy of `target` (the same weights, upcast; made once and freed at the end) generates every batch of
    `inputs` greedily; each row is compared with the reduced-precision reference of the same call.

    Args:
        target: the target in bfloat16 or float16.
        inputs (`Sequence[Mapping[str, torch.Tensor]]`): the batches, as rendered for the benchmark.
        max_new_tokens (`Sequence[int]`): `max_new_tokens` of each batch.
        references (`Mapping[int, PlainReference]`): the reduced-precision plain reference of each batch index.
        batch_size (`int`): prompts per batch.
        num_prompts (`int`, *optional*): prompts in all (default: the rows of the references).

    Returns:
        `dict` (`None` when `target` is not in reduced precision): `dtype`, `reference` (`"float32"`), `batch_size`,
        `diverging_prompts`, `prompts`, `rate` (= diverging / prompts) and `divergences` (as
        [`find_divergences`], with `margin_float32`: the float32 target's own margin at that position).
    """
    dtype = target.get_output_embeddings().weight.dtype
    if dtype not in REDUCED_PRECISION:
        return None
    device = target.get_output_embeddings().weight.device
    reference_model = copy.deepcopy(target).to(torch.float32).eval()
    eos_ids = eos_token_ids(target)
    divergences = []
    try:
        for unit, (batch, max_new) in enumerate(zip(inputs, max_new_tokens)):
            if unit not in references:
                continue
            upcast = {key: value.to(torch.float32) if value.is_floating_point() else value
                      for key, value in batch.items()}
            full = PlainReference.run(reference_model, upcast, max_new, eos_ids)
            for entry in find_divergences([(unit, full.rows)], references, batch_size):
                entry.pop("diverging_runs")
                entry["margin_float32"] = full.margin(entry["row"], entry["first_diff"])
                divergences.append(entry)
    finally:
        del reference_model
        _free(device)
    prompts = num_prompts if num_prompts is not None else sum(len(r.rows) for r in references.values())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "reference": "float32",
        "batch_size": batch_size,
        "diverging_prompts": len(divergences),
        "prompts": prompts,
        "rate": len(divergences) / prompts if prompts else None,
        "divergences": divergences,
    }
