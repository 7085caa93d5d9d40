"""Speculation statistics returned with `return_dict_in_generate=True`.

Conventions (stated once, used everywhere in the library):

* **mean acceptance length** (`mean_accept_len`) = tokens emitted per target verification forward, **including the
  bonus token** the target contributes at the end of every cycle (vLLM's convention; EAGLE's "τ" in its papers). A
  draft that is always wrong gives 1.0.
* `mean_accepted_draft_tokens` = the same **without** the bonus (ViSpec's / EAGLE code's τ) = `mean_accept_len - 1`
  except where generation stopped inside a chunk.
* `acceptance_per_depth[d]` = fraction of cycles whose accepted path reached draft depth `d + 1`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpeculationStats:
    """
    Counters of one `generate` call (summed over rows for batch > 1).

    Args:
        target_forwards (`int`): target verification forwards (the prefill is not counted).
        draft_forwards (`int`): draft forwards (catch-up + tree expansion steps).
        tokens_emitted (`int`): new tokens produced by verification cycles (the first token, which comes from the
            prefill, is not counted).
        accepted_draft_tokens (`int`): draft tokens accepted over all cycles.
        drafted_tokens (`int`): draft tokens proposed (tree nodes) over all cycles.
        accepted_per_cycle (`list[int]`): tokens emitted by each cycle, bonus included.
        nodes_per_cycle (`list[int]`): draft nodes verified by each cycle (varies with the adaptive tree).
        depth_reached (`list[int]`): per tree depth `d` (1-based index `d - 1`), cycles whose path reached it.
        prefill_tokens (`int`): tokens in the target prefill (all rows).
        draft_prefill_tokens (`int`): tokens the draft actually saw in its prefill (fewer with a visual compressor).
        draft_prefill_seconds (`float`): wall time of the draft's prefill (compressor included; the device is
            synchronised around it on CUDA).
        target_seconds (`float`): wall time inside the target's forwards (prefill + every verification forward).
        target_prefill_seconds (`float`): the part of `target_seconds` spent in the prefill.
        draft_seconds (`float`): wall time inside the draft's forwards (prefill, catch-up and tree expansion, its
            LM head included).
        draft_step_seconds (`float`): the part of `draft_seconds` spent in tree expansion steps (one step: a draft
            forward over the tree's frontier plus its LM head).
        draft_steps (`int`): tree expansion steps; a batched step drafting several rows at once counts once.
        total_seconds (`float`): wall time of the whole decoding call; `total - target - draft` is the loop's own
            time (tree building, masks, acceptance walk, stopping checks, cache compaction, Python).
        verify_seconds_per_forward (`list[float]`): wall time of every verification forward (its lazily applied LM
            head included), in order; one entry per forward, however many rows it verified.
        batched_forwards (`int`): verification forwards that verified several rows at once (batch > 1: one per cycle
            for every unfinished row, `generation/batched.py`); `target_forwards` counts row-cycles, so the mean
            acceptance length keeps its per-row meaning; 0 when rows were verified one by one.
        undrafted_cycles (`int`): verification cycles whose tree held no draft node (adaptive trees found drafting
            not worth its cost: only the n-gram branch, or the root alone, was verified; see
            `adaptive.AdaptiveTreeSizer.should_draft`).
        exact_verification (`bool`): whether verification ran the exact row-wise attention
            (`specvlm_hf.generation.exact_attention`), which makes reduced-precision greedy output bitwise equal to
            plain decoding on machines whose kernels pass the probe.
    """

    target_forwards: int = 0
    draft_forwards: int = 0
    tokens_emitted: int = 0
    accepted_draft_tokens: int = 0
    drafted_tokens: int = 0
    accepted_per_cycle: list[int] = field(default_factory=list)
    nodes_per_cycle: list[int] = field(default_factory=list)
    depth_reached: list[int] = field(default_factory=list)
    prefill_tokens: int = 0
    draft_prefill_tokens: int = 0
    compressor_choices: dict[str, int] = field(default_factory=dict)
    draft_prefill_seconds: float = 0.0
    target_seconds: float = 0.0
    target_prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    draft_step_seconds: float = 0.0
    draft_steps: int = 0
    total_seconds: float = 0.0
    verify_seconds_per_forward: list[float] = field(default_factory=list)
    batched_forwards: int = 0
    undrafted_cycles: int = 0
    exact_verification: bool = False

    def record_cycle(self, n_accepted_draft: int, n_emitted: int, n_drafted: int) -> None:
        """Adds one verification cycle that accepted `n_accepted_draft` draft tokens and emitted `n_emitted`."""
        self.target_forwards += 1
        self.tokens_emitted += n_emitted
        self.accepted_draft_tokens += n_accepted_draft
        self.drafted_tokens += n_drafted
        self.accepted_per_cycle.append(n_emitted)
        self.nodes_per_cycle.append(n_drafted)
        if len(self.depth_reached) < n_accepted_draft:
            self.depth_reached.extend([0] * (n_accepted_draft - len(self.depth_reached)))
        for d in range(n_accepted_draft):
            self.depth_reached[d] += 1

    def merge(self, other: "SpeculationStats") -> "SpeculationStats":
        """Sums two stats objects (used across batch rows)."""
        out = SpeculationStats(**asdict(self))
        for name in ("target_forwards", "draft_forwards", "tokens_emitted", "accepted_draft_tokens", "drafted_tokens",
                     "prefill_tokens", "draft_prefill_tokens", "draft_prefill_seconds", "target_seconds",
                     "target_prefill_seconds", "draft_seconds", "draft_step_seconds", "draft_steps", "batched_forwards",
                     "undrafted_cycles"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.exact_verification = self.exact_verification or other.exact_verification
        out.total_seconds = max(self.total_seconds, other.total_seconds)  # one call's wall time, not a per-row sum
        out.accepted_per_cycle = self.accepted_per_cycle + other.accepted_per_cycle
        out.nodes_per_cycle = self.nodes_per_cycle + other.nodes_per_cycle
        out.verify_seconds_per_forward = self.verify_seconds_per_forward + other.verify_seconds_per_forward
        depth = max(len(self.depth_reached), len(other.depth_reached))
        out.depth_reached = [
            (self.depth_reached[d] if d < len(self.depth_reached) else 0)
            + (other.depth_reached[d] if d < len(other.depth_reached) else 0)
            for d in range(depth)
        ]
        out.compressor_choices = dict(self.compressor_choices)
        for key, value in other.compressor_choices.items():
            out.compressor_choices[key] = out.compressor_choices.get(key, 0) + value
        return out

    @property
    def mean_accept_len(self) -> float | None:
        """Tokens per verification forward, bonus token **included**; `None` before the first cycle."""
        return self.tokens_emitted / self.target_forwards if self.target_forwards else None

    @property
    def mean_accepted_draft_tokens(self) -> float | None:
        """Accepted draft tokens per verification forward, bonus token **excluded**."""
        return self.accepted_draft_tokens / self.target_forwards if self.target_forwards else None

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Fraction of cycles whose accepted path reached each draft depth (index 0 = depth 1)."""
        if not self.target_forwards:
            return []
        return [count / self.target_forwards for count in self.depth_reached]

    @property
    def mean_draft_step_seconds(self) -> float | None:
        """Mean wall time of one tree expansion step (draft forward over the frontier + its head); `None` without one."""
        return self.draft_step_seconds / self.draft_steps if self.draft_steps else None

    @property
    def time_fractions(self) -> dict[str, float] | None:
        """
        Shares of the call's wall time: `target_forward` (the target's forwards), `draft` (the draft's forwards) and
        `loop` (everything else); they sum to 1. `None` when no time was recorded.
        """
        if self.total_seconds <= 0:
            return None
        target = min(self.target_seconds / self.total_seconds, 1.0)
        draft = min(self.draft_seconds / self.total_seconds, 1.0 - target)
        return {"target_forward": target, "draft": draft, "loop": 1.0 - target - draft}

    def to_dict(self) -> dict:
        """Plain dict with the derived metrics, for JSON reports."""
        data = asdict(self)
        data.update(
            mean_accept_len=self.mean_accept_len,
            mean_accepted_draft_tokens=self.mean_accepted_draft_tokens,
            acceptance_per_depth=self.acceptance_per_depth,
            mean_draft_step_seconds=self.mean_draft_step_seconds,
            time_fractions=self.time_fractions,
        )
        return data
