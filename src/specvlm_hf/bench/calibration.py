"""Tree-budget calibration: choose `tree_depth` and `tree_total_tokens` from measured costs and acceptance.

A verification cycle with a tree of `n` draft nodes (root excluded) and depth `D` emits on average `tau(n, D)` tokens
(bonus included) and costs

    verify(n + 1) + draft_cycle(D) + overhead

seconds, where `verify(m)` is one verification forward of `m` query tokens (its lazily applied LM head included),
`draft_cycle(D)` the draft's catch-up forward plus a `D`-step tree expansion, and `overhead` the rest of the loop (tree
walk, KV compaction, stopping criteria), estimated from the pilot. `verify` and `draft_cycle` are measured inside the
decoding loop itself (`target.generate(..., assistant_model=draft)` with a fixed tree, reading `out.speculation`), so
the calibration times exactly the code path generation runs and has no prefill, masks or positions of its own. Plain decoding costs `t_plain` seconds per token, so the modelled
speedup is

    speedup(n, D) = tau(n, D) * t_plain / (verify(n + 1) + draft_cycle(D) + overhead)

and the calibration picks its argmax over `1 <= D <= max_depth`, `D <= n <= max_nodes`.

`tau` comes from a pilot: `specvlm_tree` with a generous depth on the first prompts for a few budgets `n_i`, giving the
per-depth acceptance `a_d(n_i)` (fraction of cycles whose accepted path reached depth `d`). Between budgets `a_d` is
interpolated linearly (with `a_d(0) = 0`, held constant beyond the largest budget, made non-decreasing in `n`), and

    tau(n, D) = 1 + sum_{d <= min(D, n)} a_d(n)

Truncating the pilot's profile at depth `D` ignores that a shallower tree spends its budget on wider levels, so `tau`
is slightly pessimistic for `D` below the pilot depth. The draft's `tree_top_k` is kept (the draft config's value).
All pure pieces ([`acceptance_at`], [`expected_tokens`], [`predict_speedup`], [`choose_tree_budget`]) take plain
numbers and callables; [`calibrate`] does the measuring.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "DEFAULT_PILOT_BUDGETS",
    "CalibrationResult",
    "CostCurve",
    "TreeChoice",
    "acceptance_at",
    "calibrate",
    "choose_tree_budget",
    "expected_tokens",
    "measure_draft_costs",
    "measure_verify_costs",
    "predict_speedup",
]

#: Query-token counts (root included) at which the verification forward is timed; others are interpolated.
DEFAULT_BLOCK_SIZES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 65)
#: `tree_total_tokens` values run in the pilot.
DEFAULT_PILOT_BUDGETS: tuple[int, ...] = (4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------------------------------------------
# pure model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CostCurve:
    """
    Median seconds of one target forward per number of query tokens, interpolated linearly in between (and
    extrapolated along the last segment beyond the largest measured size).

    Args:
        sizes (`list[int]`): query tokens per forward (root included), increasing.
        seconds (`list[float]`): median seconds at each size.
    """

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self):
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("sizes and seconds must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"sizes must be increasing, got {self.sizes}")

    def __call__(self, size: float) -> float:
        xs, ys = self.sizes, self.seconds
        if len(xs) == 1 or size <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if size <= xs[i]:
                w = (size - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + w * (ys[i] - ys[i - 1])
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (size - xs[-1])


def _monotone_profile(acceptance: dict[int, Sequence[float]]) -> tuple[list[int], list[list[float]]]:
    """Budgets sorted, and per budget the per-depth acceptance made non-decreasing across budgets (running max)."""
    if not acceptance:
        raise ValueError("acceptance is empty: run a pilot first")
    budgets = sorted(acceptance)
    depth = max(len(acceptance[b]) for b in budgets)
    rows = [[float(acceptance[b][d]) if d < len(acceptance[b]) else 0.0 for d in range(depth)] for b in budgets]
    for i in range(1, len(rows)):
        rows[i] = [max(x, y) for x, y in zip(rows[i], rows[i - 1])]
    return budgets, rows


def acceptance_at(acceptance: dict[int, Sequence[float]], n: float) -> list[float]:
    """
    Per-depth acceptance `a_d(n)` for a budget of `n` nodes, interpolated from pilot budgets.

    Args:
        acceptance (`dict[int, Sequence[float]]`): pilot budget -> acceptance per depth (index 0 = depth 1).
        n (`float`): budget (draft nodes, root excluded).

    Returns:
        `list[float]`: `a_d(n)` for every depth of the profile; `a_d = 0` for `d > n` (a tree of `n` nodes is at most
        `n` deep).
    """
    budgets, rows = _monotone_profile(acceptance)
    xs = [0, *budgets]
    table = [[0.0] * len(rows[0]), *rows]
    if n >= xs[-1]:
        values = list(table[-1])
    else:
        i = next(i for i in range(1, len(xs)) if n <= xs[i])
        w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
        values = [a + w * (b - a) for a, b in zip(table[i - 1], table[i])]
    return [value if d + 1 <= n else 0.0 for d, value in enumerate(values)]


def expected_tokens(acceptance: dict[int, Sequence[float]], n: float, depth: int) -> float:
    """Modelled tokens per cycle `tau(n, D) = 1 + sum_{d <= min(D, n)} a_d(n)` (bonus token included)."""
    return 1.0 + sum(acceptance_at(acceptance, n)[:depth])


def predict_speedup(
    n: int,
    depth: int,
    *,
    acceptance: dict[int, Sequence[float]],
    verify_cost: Callable[[int], float],
    draft_cycle_cost: Callable[[int], float],
    plain_token_seconds: float,
    overhead_seconds: float = 0.0,
) -> float:
    """
    Modelled speedup over plain decoding of a tree with `n` nodes and depth `depth` (see the module docstring).

    Args:
        n (`int`): draft nodes per tree (`tree_total_tokens`).
        depth (`int`): `tree_depth`.
        acceptance (`dict[int, Sequence[float]]`): pilot budget -> acceptance per depth.
        verify_cost (`Callable[[int], float]`): seconds of a target forward of `m` query tokens.
        draft_cycle_cost (`Callable[[int], float]`): seconds of the draft's work per cycle at a given depth.
        plain_token_seconds (`float`): seconds per token of plain decoding.
        overhead_seconds (`float`, *optional*, defaults to 0): other per-cycle cost of the loop.
    """
    cycle = verify_cost(n + 1) + draft_cycle_cost(depth) + overhead_seconds
    return expected_tokens(acceptance, n, depth) * plain_token_seconds / cycle


@dataclass
class TreeChoice:
    """
    The calibrated tree.

    Args:
        depth (`int`): chosen `tree_depth`.
        total_tokens (`int`): chosen `tree_total_tokens`.
        predicted_speedup (`float`): modelled speedup of the choice.
        expected_tokens (`float`): modelled tokens per cycle of the choice (bonus included).
        grid (`dict[int, list[float]]`): depth -> modelled speedup for `n = 1 .. max_nodes` (`None` where the drafter
            cannot build such a tree).
    """

    depth: int
    total_tokens: int
    predicted_speedup: float
    expected_tokens: float
    grid: dict[int, list[float | None]] = field(default_factory=dict)


def choose_tree_budget(
    acceptance: dict[int, Sequence[float]],
    verify_cost: Callable[[int], float],
    draft_cycle_cost: Callable[[int], float],
    plain_token_seconds: float,
    *,
    max_nodes: int = 64,
    max_depth: int | None = None,
    overhead_seconds: float = 0.0,
    top_k: int | None = None,
) -> TreeChoice:
    """
    Picks `(tree_depth, tree_total_tokens)` maximising [`predict_speedup`] (ties: fewer nodes, then shallower).

    Only trees the drafter can build are considered: at least `depth` nodes and, with `top_k`, at most the
    `top_k + (depth - 1) * top_k**2` candidates that an EAGLE-2 expansion of that depth records.

    Args:
        acceptance (`dict[int, Sequence[float]]`): pilot budget -> acceptance per depth (index 0 = depth 1).
        verify_cost (`Callable[[int], float]`): seconds of a target forward of `m` query tokens (root included).
        draft_cycle_cost (`Callable[[int], float]`): seconds of the draft's work per cycle at depth `D`.
        plain_token_seconds (`float`): seconds per token of plain decoding.
        max_nodes (`int`, *optional*, defaults to 64): largest `tree_total_tokens` considered.
        max_depth (`int`, *optional*): largest depth considered (default: the depth of the pilot profile).
        overhead_seconds (`float`, *optional*, defaults to 0): other per-cycle cost of the loop.
        top_k (`int`, *optional*): the drafter's `tree_top_k`, which bounds the nodes a tree of a given depth can hold.

    Returns:
        [`TreeChoice`].
    """
    if plain_token_seconds <= 0:
        raise ValueError(f"plain_token_seconds must be positive, got {plain_token_seconds}")
    profile_depth = max(len(v) for v in acceptance.values()) if acceptance else 0
    max_depth = min(max_depth or profile_depth, profile_depth) or 1
    best: tuple[float, int, int] | None = None
    grid: dict[int, list[float | None]] = {}
    for depth in range(1, max_depth + 1):
        row: list[float | None] = []
        capacity = top_k + (depth - 1) * top_k**2 if top_k else max_nodes
        for n in range(1, max_nodes + 1):
            if n < depth or n > capacity:
                row.append(None)
                continue
            value = predict_speedup(
                n, depth, acceptance=acceptance, verify_cost=verify_cost, draft_cycle_cost=draft_cycle_cost,
                plain_token_seconds=plain_token_seconds, overhead_seconds=overhead_seconds,
            )
            row.append(value)
            key = (round(value, 12), -n, -depth)
            if best is None or key > (round(best[0], 12), -best[1], -best[2]):
                best = (value, n, depth)
        grid[depth] = row
    assert best is not None
    value, n, depth = best
    return TreeChoice(depth=depth, total_tokens=n, predicted_speedup=value,
                      expected_tokens=expected_tokens(acceptance, n, depth), grid=grid)


# ----------------------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_stats(target: Any, draft: Any, inputs: dict[str, torch.Tensor], new_tokens: int, **knobs: Any):
    """
    Runs the decoding loop itself (`target.generate(..., assistant_model=draft)`: its prefill, masks, positions,
    exact attention and lazy LM head) for exactly `new_tokens` tokens with a fixed tree shape, and returns its
    `SpeculationStats`: the calibration times what generation runs, with no code of its own.
    """
    out = target.generate(
        **inputs, assistant_model=draft, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        return_dict_in_generate=True, tree_adaptive=False, tree_ngram_tokens=0, **knobs,
    )
    return out.speculation, out.sequences


@torch.no_grad()
def measure_verify_costs(
    target: Any,
    draft: Any,
    inputs: dict[str, torch.Tensor],
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    repeats: int = 5,
    loop_kwargs: Mapping[str, Any] | None = None,
) -> tuple[CostCurve, float]:
    """
    Times verification forwards of `m` query tokens (root included) inside the decoding loop, on the prompt of
    `inputs`: one generate call per size with a drafter that proposes the same chain of `m - 1` nodes every cycle
    (`generation.drafters.FixedBlockDrafterFactory`), so every forward is built, run and its logits read exactly as in
    generation (lazy LM head, exact attention where it applies). The value per size is the median of the call's
    verification forwards (`SpeculationStats.verify_seconds_per_forward`, the first one dropped as a warm-up). Also
    times plain decoding per token: plain `generate` for `repeats + 1` tokens minus plain `generate` for 1, per token.

    `loop_kwargs` (e.g. `{"exact_verification": False}`) go to every speculative call, as the benchmarked method
    passes them.

    Returns:
        `tuple[CostCurve, float]`: the verification cost curve and plain decoding's seconds per token.
    """
    from ..generation.drafters import FixedBlockDrafterFactory

    device = target.get_output_embeddings().weight.device
    prompt_len = inputs["input_ids"].shape[1]
    first, one_seconds = _timed_generate(target, inputs, device, max_new_tokens=1, do_sample=False)
    token = int(first[0, prompt_len])  # an ordinary text token of this prompt's continuation for the blocks
    steps = max(int(repeats), 1)
    _, more_seconds = _timed_generate(target, inputs, device, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                      do_sample=False)
    decode_seconds = max(more_seconds - one_seconds, 1e-9) / steps
    seconds = []
    for size in block_sizes:
        stats, _ = _loop_stats(target, draft, inputs, steps + 2, tree_drafter=FixedBlockDrafterFactory(size - 1, token),
                               **(loop_kwargs or {}))
        timed = stats.verify_seconds_per_forward
        seconds.append(statistics.median(timed[1:] if len(timed) > 1 else timed))
    return CostCurve(list(block_sizes), seconds), decode_seconds


@dataclass
class DraftCosts:
    """
    Measured draft work per cycle.

    Args:
        depths (`list[int]`): tree depths timed.
        propose_seconds (`list[float]`): draft seconds per cycle at each depth, measured in the decoding loop
            (catch-up forward + tree expansion, see [`measure_draft_costs`]).
        extend_seconds (`float`): catch-up seconds counted apart from `propose_seconds` (0 when they include it).
        step_seconds (`float`): least-squares slope of `propose_seconds` over depth (cost of one draft step).
        fixed_seconds (`float`): least-squares intercept of `propose_seconds` over depth.
    """

    depths: list[int]
    propose_seconds: list[float]
    extend_seconds: float
    step_seconds: float
    fixed_seconds: float = 0.0

    def cycle(self, depth: int) -> float:
        """Draft seconds per cycle at `depth`: catch-up + the fitted line of the expansion (robust to one slow
        timing on a busy machine)."""
        return self.extend_seconds + max(self.fixed_seconds + self.step_seconds * depth, 0.0)


@torch.no_grad()
def measure_draft_costs(
    target: Any,
    draft: Any,
    inputs: dict[str, torch.Tensor],
    depths: Sequence[int],
    top_k: int,
    repeats: int = 5,
    loop_kwargs: Mapping[str, Any] | None = None,
) -> DraftCosts:
    """
    Times the draft's work per cycle at each tree depth inside the decoding loop (one generate call per depth, a
    fixed tree of that depth with `top_k`): the draft's seconds after its prefill (`draft_seconds -
    draft_prefill_seconds` of `out.speculation`) per verification cycle, i.e. catch-up + tree expansion as generation
    runs them; `loop_kwargs` go to every call.

    Returns:
        [`DraftCosts`] (catch-up included in `propose_seconds`, so `extend_seconds` is 0).
    """
    depths = sorted({int(d) for d in depths})
    steps = max(int(repeats), 1)
    per_cycle = []
    for depth in depths:
        stats, _ = _loop_stats(target, draft, inputs, steps + 2, tree_top_k=top_k, tree_depth=depth,
                               tree_total_tokens=64, **(loop_kwargs or {}))
        cycles = max(stats.target_forwards, 1)
        per_cycle.append(max(stats.draft_seconds - stats.draft_prefill_seconds, 0.0) / cycles)
    if len(depths) > 1:
        mean_d, mean_s = statistics.fmean(depths), statistics.fmean(per_cycle)
        covariance = sum((d - mean_d) * (s - mean_s) for d, s in zip(depths, per_cycle))
        step = max(covariance / sum((d - mean_d) ** 2 for d in depths), 0.0)
        fixed = mean_s - step * mean_d
    else:
        step, fixed = per_cycle[0] / depths[0], 0.0
    return DraftCosts(depths, per_cycle, 0.0, step, fixed)


@dataclass
class CalibrationResult:
    """
    Everything the calibration measured and chose (saved in `meta.json` and drawn in `results.png`).

    Args:
        top_k (`int`): `tree_top_k` used throughout (the draft config's).
        choice (`TreeChoice`): the chosen depth and budget, and the modelled speedup grid.
        verify_curve (`CostCurve`): seconds per target forward by query tokens.
        decode_seconds (`float`): plain decoding seconds per token (plain `generate`, prefill excluded).
        draft_costs (`DraftCosts`): draft expansion and catch-up costs.
        pilot_depth (`int`): tree depth of the pilot runs.
        pilot_acceptance (`dict[int, list[float]]`): budget -> acceptance per depth in the pilot.
        pilot_mean_accept_len (`dict[int, float]`): budget -> tokens per cycle (bonus included) in the pilot.
        pilot_seconds_per_cycle (`dict[int, float]`): budget -> measured decode seconds per cycle in the pilot.
        plain_token_seconds (`float`): plain decoding seconds per token in the pilot (prefill excluded).
        overhead_seconds (`float`): per-cycle loop overhead (median of measured minus modelled, at least 0).
        pilot_prompts (`int`): prompts used by the pilot; pilot_max_new_tokens (`int`): tokens per pilot run.
        seconds (`float`): wall time of the whole calibration.
    """

    top_k: int
    choice: TreeChoice
    verify_curve: CostCurve
    decode_seconds: float
    draft_costs: DraftCosts
    pilot_depth: int
    pilot_acceptance: dict[int, list[float]]
    pilot_mean_accept_len: dict[int, float]
    pilot_seconds_per_cycle: dict[int, float]
    plain_token_seconds: float
    overhead_seconds: float
    pilot_prompts: int
    pilot_max_new_tokens: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["choice"]["grid"] = {str(k): v for k, v in self.choice.grid.items()}
        data["chosen"] = {"tree_top_k": self.top_k, "tree_depth": self.choice.depth,
                          "tree_total_tokens": self.choice.total_tokens}
        for key in ("pilot_acceptance", "pilot_mean_accept_len", "pilot_seconds_per_cycle"):
            data[key] = {str(k): v for k, v in getattr(self, key).items()}
        return data


def _timed_generate(target: Any, inputs: dict, device: torch.device, **kwargs) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = target.generate(**inputs, **kwargs)
    _sync(device)
    return out, time.perf_counter() - start


def _new_tokens(sequences: torch.Tensor, prompt_len: int) -> int:
    return int(sequences.shape[1] - prompt_len)


@torch.no_grad()
def calibrate(
    target: Any,
    draft: Any,
    inputs_list: Sequence[dict[str, torch.Tensor]],
    *,
    top_k: int | None = None,
    max_depth: int | None = None,
    budgets: Sequence[int] = DEFAULT_PILOT_BUDGETS,
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    max_nodes: int = 64,
    pilot_max_new_tokens: int = 64,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
    loop_kwargs: Mapping[str, Any] | None = None,
) -> CalibrationResult:
    """
    Measures costs and a pilot acceptance profile on `inputs_list` (batch-1 inputs; the first one is also used for
    the cost curves), then chooses the tree with [`choose_tree_budget`].

    Args:
        target, draft: the target and its SpecVLM draft.
        inputs_list (`Sequence[dict]`): pilot prompts, already rendered (batch size 1 each).
        top_k (`int`, *optional*): `tree_top_k` (default: the draft config's).
        max_depth (`int`, *optional*): pilot depth and largest depth considered (default: `max(draft depth, 6)`).
        budgets (`Sequence[int]`, *optional*): pilot `tree_total_tokens` values (clipped to `max_nodes`).
        block_sizes (`Sequence[int]`, *optional*): query-token counts timed for the verification curve.
        max_nodes (`int`, *optional*, defaults to 64): largest `tree_total_tokens` considered.
        pilot_max_new_tokens (`int`, *optional*, defaults to 64): tokens per pilot run.
        repeats (`int`, *optional*, defaults to 5): timings per cost point (median).
        progress (`Callable[[str], None]`, *optional*): called with a short description before each stage.
        loop_kwargs (`Mapping[str, Any]`, *optional*): extra `generate` keyword arguments of every speculative call,
            those the benchmarked method passes (e.g. `{"exact_verification": False}`), so the calibration times the
            verification path the method runs.

    Returns:
        [`CalibrationResult`].
    """
    start = time.perf_counter()
    say = progress or (lambda message: None)
    if not inputs_list:
        raise ValueError("calibration needs at least one prompt")
    top_k = int(top_k or draft.config.tree_top_k)
    pilot_depth = int(max_depth or max(draft.config.tree_depth, 6))
    budgets = sorted({min(int(b), max_nodes) for b in budgets if b >= 1})
    device = target.get_output_embeddings().weight.device
    sizes = sorted({int(s) for s in block_sizes if 1 <= s <= max_nodes + 1} | {1, max_nodes + 1})

    say("calibration: target forward cost by query tokens")
    verify_curve, decode_seconds = measure_verify_costs(target, draft, inputs_list[0], sizes, repeats, loop_kwargs)
    say("calibration: draft cost by depth")
    draft_costs = measure_draft_costs(target, draft, inputs_list[0], range(1, pilot_depth + 1), top_k, repeats,
                                      loop_kwargs)

    common = {"max_new_tokens": pilot_max_new_tokens, "do_sample": False}
    plain_seconds = plain_tokens = 0.0
    ttfts = []
    say("calibration: pilot (plain decoding)")
    for inputs in inputs_list:
        prompt_len = inputs["input_ids"].shape[1]
        _, ttft = _timed_generate(target, inputs, device, max_new_tokens=1, do_sample=False)
        out, seconds = _timed_generate(target, inputs, device, **common)
        ttfts.append(ttft)
        plain_seconds += max(seconds - ttft, 0.0)
        plain_tokens += max(_new_tokens(out, prompt_len) - 1, 0)
    plain_token_seconds = plain_seconds / plain_tokens if plain_tokens else decode_seconds

    from ..generation.stats import SpeculationStats

    acceptance: dict[int, list[float]] = {}
    mean_accept: dict[int, float] = {}
    per_cycle: dict[int, float] = {}
    residuals = []
    for budget in budgets:
        say(f"calibration: pilot tree_total_tokens={budget}")
        stats = SpeculationStats()
        decode_seconds_total = 0.0
        for inputs, ttft in zip(inputs_list, ttfts):
            out, seconds = _timed_generate(
                target, inputs, device, assistant_model=draft, return_dict_in_generate=True, tree_top_k=top_k,
                tree_depth=pilot_depth, tree_total_tokens=budget, **common, **(loop_kwargs or {}),
            )
            stats = stats.merge(out.speculation)
            decode_seconds_total += max(seconds - ttft, 0.0)
        profile = stats.acceptance_per_depth
        acceptance[budget] = [profile[d] if d < len(profile) else 0.0 for d in range(pilot_depth)]
        mean_accept[budget] = stats.mean_accept_len or 1.0
        if stats.target_forwards:
            per_cycle[budget] = decode_seconds_total / stats.target_forwards
            modelled = verify_curve(budget + 1) + draft_costs.cycle(pilot_depth)
            residuals.append(per_cycle[budget] - modelled)
    overhead = max(statistics.median(residuals), 0.0) if residuals else 0.0

    choice = choose_tree_budget(
        acceptance, verify_curve, draft_costs.cycle, plain_token_seconds,
        max_nodes=max_nodes, max_depth=pilot_depth, overhead_seconds=overhead, top_k=top_k,
    )
    return CalibrationResult(
        top_k=top_k, choice=choice, verify_curve=verify_curve, decode_seconds=decode_seconds,
        draft_costs=draft_costs, pilot_depth=pilot_depth, pilot_acceptance=acceptance,
        pilot_mean_accept_len=mean_accept, pilot_seconds_per_cycle=per_cycle,
        plain_token_seconds=plain_token_seconds, overhead_seconds=overhead, pilot_prompts=len(inputs_list),
        pilot_max_new_tokens=pilot_max_new_tokens, seconds=time.perf_counter() - start,
    )
