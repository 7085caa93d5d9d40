"""
Acceptance ceilings under sampling: how many tokens per cycle a *perfect* deterministic draft could get accepted at
temperature `T` with this library's acceptance rule, given nothing but the target's own entropy.

At `T = 0` a perfect draft accepts its whole depth every cycle (the bench's `oracle` method measures what the loop
makes of that). Under sampling it cannot: the loop's drafts propose fixed children (the draft's top-k), and the loop
samples the target's token at every tree node and descends only if that token is one of the node's children ("sample
then descend", `specvlm_hf.generation.acceptance`). So even a draft whose children at every node are exactly the
target's own `k` most likely tokens is accepted at a depth only when the sampled token falls among them. The ceiling
therefore follows from plain sampling alone:

1. sample the target's continuation as plain `generate` does (same processors, same seed);
2. for every emitted token, its rank in the distribution it was sampled from (0 = the most likely token);
3. replay the cycles of a perfect, *complete* `k`-ary tree of depth `d` over that sequence: a cycle accepts the run
   of consecutive tokens whose rank is below `k` (at most `d`), then one more token (the bonus).

Tokens per cycle of step 3 bound the `mean_accept_len` of every deterministic draft with at most `k` children per
node and depth `d` under this rule, whatever its node budget (real trees hold far fewer than `k ** d` nodes, so they
stay below it). Ties are counted in the draft's favour (a token tied with the `k`-th is a hit). The bound does not
apply to *stochastic* drafting (children drawn from the draft's distribution `q`, accepted with probability
`min(1, p / q)`, SpecInfer-style), where a draft with `q = p` would accept its whole depth at any temperature; the
library does not implement that rule.

```python
from specvlm_hf.bench.ceiling import sampling_ceiling
from specvlm_hf.bench.prompts import DEFAULT_PROMPTS_PATH, load_prompts

ceiling = sampling_ceiling(target, processor, load_prompts(DEFAULT_PROMPTS_PATH), temperature=1.0)
print(ceiling.to_markdown())
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserValueError

DEFAULT_CEILING_KS = (1, 2, 4, 8, 16)
DEFAULT_CEILING_DEPTHS = (2, 4, 6, 8)


def ceiling_cycles(ranks: Sequence[int], k: int, depth: int) -> int:
    """
    Verification cycles a perfect complete `k`-ary tree of depth `depth` needs to emit a sampled sequence.

    Args:
        ranks (`Sequence[int]`): rank of every token emitted after the first (the first comes from the prefill's
            logits, outside any cycle), 0 = the most likely token of the distribution it was sampled from.
        k (`int`): children per tree node.
        depth (`int`): draft depth.

    Returns:
        `int`: the number of cycles; `len(ranks) / cycles` is the mean acceptance length, bonus included.
    """
    if k < 1 or depth < 1:
        raise UserValueError(f"k and depth must be at least 1, got k={k}, depth={depth}")
    cycles, position, length = 0, 0, len(ranks)
    while position < length:
        accepted = 0
        while accepted < depth and position + accepted < length and ranks[position + accepted] < k:
            accepted += 1
        cycles += 1
        position += accepted + 1  # the accepted run, then the target's own (bonus) token
    return cycles


@dataclass
class SamplingCeiling:
    """
    The acceptance ceiling of a target under sampling (see the module docstring).

    Args:
        temperature (`float`): the sampling temperature.
        prompts (`int`): prompts sampled.
        tokens (`int`): tokens the ceiling is computed over (every emitted token but each prompt's first).
        prompt_tokens (`list[int]`): the same, prompt by prompt.
        top_k_hit_rate (`dict[int, float]`): share of sampled tokens among the target's `k` most likely ones.
        mean_accept_len (`dict[tuple[int, int], float]`): `(k, depth)` -> tokens per cycle, bonus included, of a
            perfect complete `k`-ary tree of that depth.
        in_draft_vocab (`float`, *optional*): share of the same tokens inside a draft's reduced vocabulary, when one
            was given (tokens outside it can never be proposed).
    """

    temperature: float
    prompts: int
    tokens: int
    prompt_tokens: list[int] = field(default_factory=list)
    top_k_hit_rate: dict[int, float] = field(default_factory=dict)
    mean_accept_len: dict[tuple[int, int], float] = field(default_factory=dict)
    in_draft_vocab: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (`mean_accept_len` keyed `"k{k}_d{depth}"`)."""
        return {
            "temperature": self.temperature,
            "prompts": self.prompts,
            "tokens": self.tokens,
            "prompt_tokens": list(self.prompt_tokens),
            "top_k_hit_rate": {str(k): rate for k, rate in self.top_k_hit_rate.items()},
            "mean_accept_len": {f"k{k}_d{depth}": value for (k, depth), value in self.mean_accept_len.items()},
            "in_draft_vocab": self.in_draft_vocab,
        }

    def to_markdown(self) -> str:
        """A table: one row per `k` (hit rate, then the ceiling at every depth)."""
        depths = sorted({depth for _, depth in self.mean_accept_len})
        lines = [
            "| children per node k | sampled token in top-k | " + " | ".join(f"depth {d}" for d in depths) + " |",
            "|---|---|" + "---|" * len(depths),
        ]
        for k in sorted(self.top_k_hit_rate):
            cells = [f"{self.mean_accept_len[(k, d)]:.2f}" for d in depths]
            lines.append(f"| {k} | {self.top_k_hit_rate[k]:.3f} | " + " | ".join(cells) + " |")
        if self.in_draft_vocab is not None:
            lines += ["", f"Emitted tokens inside the draft's vocabulary: {self.in_draft_vocab:.3f}"]
        return "\n".join(lines)


@torch.no_grad()
def sampled_token_ranks(
    target: Any, inputs: dict[str, torch.Tensor], *, temperature: float, max_new_tokens: int, seed: int = 0,
    **generate_kwargs: Any,
) -> tuple[list[int], list[int]]:
    """
    Samples one continuation with plain `target.generate` (greedy at `temperature=0`) and returns each emitted
    token's rank in the distribution it was drawn from (after the logits processors: temperature, top-k, top-p),
    0 = the most likely token.

    Args:
        target: the target model.
        inputs (`dict[str, torch.Tensor]`): one prompt's inputs (batch 1).
        temperature (`float`): sampling temperature; 0 decodes greedily (every rank is then 0).
        max_new_tokens (`int`): tokens to sample.
        seed (`int`, *optional*, defaults to 0): `torch.manual_seed` before sampling.
        **generate_kwargs: further sampling arguments (e.g. `top_k=0, top_p=1.0`; ignored at temperature 0).

    Returns:
        `tuple[list[int], list[int]]`: the rank of every emitted token (the first included), and the tokens.
    """
    if temperature < 0:
        raise UserValueError(f"temperature must be >= 0, got {temperature}")
    if inputs["input_ids"].shape[0] != 1:
        raise UserValueError(f"sampled_token_ranks takes one prompt (batch 1), got {inputs['input_ids'].shape[0]}")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, **generate_kwargs} if temperature > 0 else {
        "do_sample": False
    }
    out = target.generate(
        **inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True, **sampling
    )
    emitted = out.sequences[0, inputs["input_ids"].shape[1]:]
    scores = torch.cat(out.scores, dim=0)[: emitted.shape[0]].float()  # (new tokens, vocab), processed logits
    chosen = scores.gather(1, emitted.view(-1, 1))
    return (scores > chosen).sum(dim=1).tolist(), emitted.tolist()


def sampling_ceiling(
    target: Any,
    processor: Any,
    prompts: Sequence[Any],
    *,
    temperature: float = 1.0,
    ks: Iterable[int] = DEFAULT_CEILING_KS,
    depths: Iterable[int] = DEFAULT_CEILING_DEPTHS,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
    draft_vocab: torch.Tensor | None = None,
    **generate_kwargs: Any,
) -> SamplingCeiling:
    """
    Measures the acceptance ceiling of `target` under sampling on `prompts` (see the module docstring).

    Args:
        target: the target model.
        processor: its processor (or tokenizer for text-only targets).
        prompts (`Sequence[BenchPrompt]`): the prompts ([`load_prompts`]); each is sampled once, batch 1, with seed
            `seed + index` (as `specvlm_hf.pocket.train_draft.bench_acceptance` seeds its sampled runs).
        temperature (`float`, *optional*, defaults to 1.0): sampling temperature (0: greedy, where the ceiling is
            `depth + 1` by construction and only `in_draft_vocab` says something).
        ks (`Iterable[int]`, *optional*): children per node to evaluate.
        depths (`Iterable[int]`, *optional*): tree depths to evaluate.
        max_new_tokens (`int`, *optional*, defaults to 128): cap on each prompt's own `max_new_tokens`.
        seed (`int`, *optional*, defaults to 0): base seed.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over prompts.
        draft_vocab (`torch.LongTensor` of shape `(draft_vocab_size,)`, *optional*): target ids a draft can propose
            (a reduced head's `d2t` map); the share of emitted tokens outside it is a further limit on acceptance,
            reported as `in_draft_vocab`.
        **generate_kwargs: further sampling arguments; the default is pure sampling (`top_k=0, top_p=1.0`).

    Returns:
        [`SamplingCeiling`].
    """
    from tqdm.auto import tqdm

    from .prompts import render_batch

    ks, depths = sorted(set(ks)), sorted(set(depths))
    generate_kwargs = {"top_k": 0, "top_p": 1.0, **generate_kwargs}
    parameter = next(target.parameters())
    sequences, emitted = [], []
    for index, prompt in enumerate(tqdm(prompts, desc="Sampling", disable=not progress)):
        inputs = render_batch(processor, [prompt], parameter.device, parameter.dtype)
        ranks, tokens = sampled_token_ranks(
            target, inputs, temperature=temperature, max_new_tokens=min(prompt.max_new_tokens, max_new_tokens),
            seed=seed + index, **generate_kwargs,
        )
        sequences.append(ranks[1:])  # the first token comes from the prefill, outside any cycle
        emitted.extend(tokens[1:])
    tokens = sum(len(ranks) for ranks in sequences)
    if tokens == 0:
        raise UserValueError("every prompt stopped after one token: nothing to measure")
    ceiling = SamplingCeiling(
        temperature=temperature, prompts=len(sequences), tokens=tokens, prompt_tokens=[len(r) for r in sequences]
    )
    if draft_vocab is not None:
        proposable = set(draft_vocab.view(-1).tolist())
        ceiling.in_draft_vocab = sum(token in proposable for token in emitted) / tokens
    for k in ks:
        ceiling.top_k_hit_rate[k] = sum(rank < k for ranks in sequences for rank in ranks) / tokens
        for depth in depths:
            cycles = sum(ceiling_cycles(ranks, k, depth) for ranks in sequences)
            ceiling.mean_accept_len[(k, depth)] = tokens / cycles
    return ceiling
