"""Adaptive tree size: the loop measures what verification and drafting cost during the call and how well the
draft's probabilities predict acceptance, and sizes every tree to maximise expected tokens per second.

The rule (documented once, here):

* **Expected accepted draft tokens** of a tree = `c * sum_nodes exp(score)`, where `score` is a node's cumulative
  draft log-probability (the probability, under the draft, that the node lies on the accepted path) and `c` is a
  calibration factor: an exponential moving average of realised over predicted accepted tokens, so an over-confident
  draft (or one that meets prompts it predicts badly) is discounted.
* **Cost of a cycle** with `n` nodes = `a + b * n` (verification, a least-squares line over the cycles so far with
  exponential forgetting, seeded by the first cycles, which alternate the full and a quarter budget to measure the
  slope) `+ (depth - 1) * t_step` (draft expansion steps) `+ t_catch_up` (the draft's catch-up forward and root
  head) `+ t_loop` (the loop's own work), each measured during the call.
* **Nodes**: after the draft has expanded the tree, keep the `N <= tree_total_tokens` best nodes that maximise
  `(1 + c * S_N) / (cost(N))`, `S_N` the sum of `exp(score)` of the `N` best.
* **Depth**: when the deepest level's expected contribution, in seconds saved (`c * sum exp(score)` of its kept nodes
  times the time per emitted token), is worth less than one draft step, the next tree is one level shallower; when it
  is worth more than two steps, one level deeper (between 1 and `tree_depth`).
* **The n-gram branch** (`ngram.py`) is modelled as a chain whose tokens are each accepted with probability `p` given
  their predecessor: `p` = accepted n-gram tokens / n-gram tokens tested, exponential moving averages over the cycles
  so far (0 before any evidence, so a call starts as if the branch predicted nothing). A cycle whose candidate has `L`
  tokens expects `G = p + p^2 + ... + p^L` tokens from it. The draft's nodes and the branch are alternatives below the
  root, so the draft's expected tokens count only when the branch's first token fails: the node rule maximises
  `(1 + G + (1 - p) * c * S_N) / (cost(N + L))` and the depth rule weighs the deepest level by `(1 - p)` too. On
  text the context repeats, the draft's tree thus shrinks while the branch carries the cycle (prompt lookup's regime);
  elsewhere `p` stays near 0 and nothing changes.

* **Whether to draft at all**: before each cycle, the expected rate with the draft's tree,
  `(1 + G + (1 - p) * c * S) / (cost(N + L) + (depth - 1) * t_step + t_catch_up + t_loop)` (`S`, `N`: moving averages
  of the kept gain and node count of the trees drafted so far; `t_catch_up`: the draft's own time per cycle outside
  its expansion steps: the catch-up forward and the root's head), is compared with the rate without it,
  `(1 + G) / (cost(L) + t_loop)`: the n-gram branch alone (or the root alone, a plain decoding step, without a
  candidate). When the rate without it is higher by more than `SKIP_MARGIN` (10 %: the inputs are moving averages,
  and borderline cycles are better drafted), the cycle verifies without the draft's tree and the draft's catch-up is
  deferred: the tokens committed meanwhile are caught up in one forward when it drafts again. After `PROBE_EVERY`
  cycles without drafting it drafts once to re-measure. On text the context repeats, this is prompt lookup's regime at
  prompt lookup's cost; with a draft that predicts nothing, it is plain decoding plus a probe every few cycles.

A draft that accepts nothing thus costs little, and a good draft grows its tree. Greedy output and the sampling law do not depend on the tree's shape, so the adaptation is lossless.
Per-call `tree_adaptive=False` keeps the tree fixed at the call's knobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Forgetting factor of the verification-cost fit and of the moving averages (per cycle).
DECAY = 0.9
#: Cycles whose budgets alternate between the full and a quarter budget to measure the verification slope.
WARMUP_CYCLES = 4
#: Consecutive cycles without drafting after which the draft drafts once to re-measure its value.
PROBE_EVERY = 8
#: A cycle skips the draft only when the modelled rate without it beats the rate with it by more than this fraction
#: (the model's inputs are moving averages; a margin keeps borderline cycles drafting).
SKIP_MARGIN = 0.1


@dataclass
class AdaptiveTreeSizer:
    """
    Per-row state of the adaptive tree rule (see the module docstring).

    Args:
        max_depth (`int`): the call's `tree_depth` (upper bound).
        max_nodes (`int`): the call's `tree_total_tokens` (upper bound).
    """

    max_depth: int
    max_nodes: int
    depth: int = 0
    calibration: float = 1.0
    cycles: int = 0
    step_seconds: float | None = None  # one draft expansion step
    loop_seconds: float = 0.0  # the loop's own time per cycle (+ the draft's catch-up when the loop cannot time it)
    catch_up_seconds: float = 0.0  # the draft's time per drafted cycle outside its expansion steps
    since_draft: int = 0  # consecutive cycles verified without the draft's tree
    _kept_gain: float = 0.0  # moving average of `sum exp(score)` of the drafted trees' kept nodes
    _kept_nodes: float = 0.0  # moving average of their node count
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5)  # weighted n, x, y, xx, xy
    _predicted: float = 0.0
    _realised: float = 0.0
    _ngram_hits: float = 0.0  # accepted n-gram tokens (moving sum)
    _ngram_trials: float = 0.0  # n-gram tokens tested: accepted ones + the first rejected one (moving sum)
    ngram_tokens: int = 0  # length of this cycle's n-gram candidate (`expect_ngram`)

    def __post_init__(self):
        self.depth = self.depth or self.max_depth

    # ------------------------------------------------------------------------------------------------------------
    @property
    def ngram_accept_rate(self) -> float:
        """`p`: probability that an n-gram token is accepted given its predecessor was (0 without evidence)."""
        return self._ngram_hits / self._ngram_trials if self._ngram_trials > 0 else 0.0

    @property
    def ngram_gain(self) -> float:
        """Expected tokens from this cycle's n-gram candidate: `p + p^2 + ... + p^L`."""
        p = self.ngram_accept_rate
        return sum(p**j for j in range(1, self.ngram_tokens + 1))

    def _draft_share(self) -> float:
        """Weight of the draft's expected tokens: `1 - p` when this cycle has an n-gram candidate, else 1."""
        return 1.0 - self.ngram_accept_rate if self.ngram_tokens else 1.0

    def expect_ngram(self, tokens: int) -> None:
        """Announces this cycle's n-gram candidate length (0: none), before the draft's tree is sized."""
        self.ngram_tokens = int(tokens)

    def observe_ngram(self, tokens: int, matched: int) -> None:
        """
        Records how far this cycle's n-gram candidate of `tokens` tokens agreed with the emitted tokens (`matched`
        leading tokens, `0 <= matched <= tokens`).
        """
        if tokens <= 0:
            return
        self._ngram_hits = DECAY * self._ngram_hits + matched
        self._ngram_trials = DECAY * self._ngram_trials + matched + (1 if matched < tokens else 0)

    def verify_cost(self, nodes: torch.Tensor | float) -> torch.Tensor | float:
        """Modelled seconds of a verification forward over `nodes` draft nodes (+ the root)."""
        w, sx, sy, sxx, sxy = self._fit
        if w <= 0:
            return nodes * 0.0
        mean_x, mean_y = sx / w, sy / w
        var = sxx / w - mean_x**2
        slope = max((sxy / w - mean_x * mean_y) / var, 0.0) if var > 1e-9 else 0.0
        return mean_y + slope * (nodes - mean_x)

    def budget(self, scores: torch.Tensor) -> int:
        """How many of the recorded candidates to keep, given their cumulative draft log-probabilities."""
        if scores.numel() == 0:
            return 0
        cap = min(self.max_nodes, scores.numel())
        if self.cycles < WARMUP_CYCLES:
            return cap if self.cycles % 2 == 0 else max(1, cap // 4)
        gains = torch.sort(scores.float().exp(), descending=True).values[:cap].cumsum(0)
        n = torch.arange(1, cap + 1, dtype=torch.float32)
        fixed = self._draft_seconds() + self.loop_seconds
        expected = 1.0 + self.ngram_gain + self._draft_share() * self.calibration * gains
        rate = expected / (self.verify_cost(n + self.ngram_tokens) + fixed).clamp(min=1e-6)
        return int(rate.argmax()) + 1

    def _draft_seconds(self) -> float:
        """Modelled seconds the draft spends on one tree at the current depth (steps + catch-up)."""
        return max(self.depth - 1, 0) * (self.step_seconds or 0.0) + self.catch_up_seconds

    def should_draft(self) -> bool:
        """
        Whether this cycle's tree should include the draft's nodes (see "Whether to draft at all" in the module
        docstring); call after [`expect_ngram`]. True until the call has measured a drafted tree's cost and value.
        """
        if self.cycles < WARMUP_CYCLES or self._kept_nodes <= 0 or self.since_draft >= PROBE_EVERY:
            return True
        branch = float(self.ngram_tokens)
        plain = (1.0 + self.ngram_gain) / max(float(self.verify_cost(branch)) + self.loop_seconds, 1e-6)
        drafted_cost = float(self.verify_cost(self._kept_nodes + branch)) + self._draft_seconds() + self.loop_seconds
        drafted = (1.0 + self.ngram_gain + self._draft_share() * self.calibration * self._kept_gain) / max(
            drafted_cost, 1e-6)
        return drafted * (1.0 + SKIP_MARGIN) > plain

    def observe(
        self,
        nodes: int,
        predicted: float,
        accepted: int,
        verify_seconds: float,
        step_seconds: float | None,
        cycle_seconds: float,
        deepest_gain: float,
        draft_seconds: float | None = None,
        drafted: bool = True,
        draft_nodes: int | None = None,
    ) -> None:
        """
        Records one cycle and updates the model and the next depth.

        Args:
            nodes (`int`): nodes verified (the draft's and the n-gram branch's).
            predicted (`float`): `sum exp(score)` over the draft's nodes.
            accepted (`int`): draft tokens accepted (nodes the draft proposed; the n-gram branch's own nodes are
                counted by [`observe_ngram`]).
            verify_seconds (`float`): the verification forward (and its LM head).
            step_seconds (`float`, *optional*): mean seconds of one draft expansion step this cycle.
            cycle_seconds (`float`): the whole cycle.
            deepest_gain (`float`): `sum exp(score)` of the kept nodes at the tree's deepest level.
            draft_seconds (`float`, *optional*): the draft's whole time this cycle (catch-up, steps, heads); when not
                given, it is counted in the loop's time.
            drafted (`bool`, *optional*, defaults to `True`): whether the tree held the draft's nodes (`False`:
                [`should_draft`] skipped the draft, which then learns nothing this cycle).
            draft_nodes (`int`, *optional*): the draft's own nodes among `nodes` (defaults to `nodes`).
        """
        self.cycles += 1
        fit = [value * DECAY for value in self._fit]
        for i, term in enumerate((1.0, nodes, verify_seconds, nodes * nodes, nodes * verify_seconds)):
            fit[i] += term
        self._fit = fit
        if not drafted:
            self.since_draft += 1
            other = max(cycle_seconds - verify_seconds, 0.0)
            self.loop_seconds = DECAY * self.loop_seconds + (1 - DECAY) * other
            return
        first = self._kept_nodes <= 0
        self.since_draft = 0
        self._kept_gain = predicted if first else DECAY * self._kept_gain + (1 - DECAY) * predicted
        kept = max(nodes if draft_nodes is None else draft_nodes, 1)
        self._kept_nodes = kept if first else DECAY * self._kept_nodes + (1 - DECAY) * kept
        self._predicted = DECAY * self._predicted + predicted
        self._realised = DECAY * self._realised + accepted
        if self._predicted > 0:
            self.calibration = min(max(self._realised / self._predicted, 0.02), 2.0)
        if step_seconds is not None:
            self.step_seconds = step_seconds if self.step_seconds is None else (
                DECAY * self.step_seconds + (1 - DECAY) * step_seconds)
        steps = max(self.depth - 1, 0) * (step_seconds or 0.0)
        if draft_seconds is not None:
            catch_up = max(draft_seconds - steps, 0.0)
            self.catch_up_seconds = catch_up if first else DECAY * self.catch_up_seconds + (1 - DECAY) * catch_up
            other = max(cycle_seconds - verify_seconds - draft_seconds, 0.0)
        else:
            other = max(cycle_seconds - verify_seconds - steps, 0.0)
        self.loop_seconds = other if self.cycles == 1 else DECAY * self.loop_seconds + (1 - DECAY) * other
        if self.cycles >= WARMUP_CYCLES and self.step_seconds:
            per_token = cycle_seconds / (accepted + 1)
            worth = self._draft_share() * self.calibration * deepest_gain * per_token
            if worth < self.step_seconds and self.depth > 1:
                self.depth -= 1
            elif worth > 2 * self.step_seconds and self.depth < self.max_depth:
                self.depth += 1

    @property
    def expected_tokens_per_second(self) -> float | None:
        """The model's current estimate for a full-budget tree (diagnostic)."""
        if not self._fit[0]:
            return None
        cost = float(self.verify_cost(float(self.max_nodes))) + self.loop_seconds
        return None if cost <= 0 or math.isnan(cost) else 1.0 / cost
