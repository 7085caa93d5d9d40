"""The measurement loop of `specvlm bench`: warm-up, interleaved timed runs, and per-method aggregation.

Protocol (per batch size, then per temperature: each such group finishes its records before the next one starts,
so an interrupted run keeps every finished group, see [`run_benchmark`]):

1. every method is warmed up once on the first batch (a short generate); a transformers assisted method that refuses
   the batch size (transformers 5.23 runs assisted decoding at batch size 1 only) is recorded as unsupported there,
   with the error;
2. for each repetition and each batch of prompts, the time to first token is measured (plain `generate` with
   `max_new_tokens=1`: vision encoding + prefill + one token), then every method runs once, in an order rotated by
   one method per repetition and per batch ([`interleaved_schedule`]), so that slow drift (thermal, other processes)
   affects every method alike;
3. each call is timed end to end (`generate` wall time, vision encoding and prefill included); at temperature `T > 0`
   every method of a batch starts from the same `torch.manual_seed`.

At temperature 0, before the warm-up, each batch of prompts runs once more, untimed, through plain `generate` with
`output_logits=True` ([`~specvlm_hf.bench.exactness.PlainReference`]): the reference of the exactness audit
(`divergences`) and the continuation the `oracle` method replays. After every group, when the target runs in bfloat16
or float16 and [`BenchSettings.noise_floor`] is on, the noise floor of plain decoding (reduced precision against a
float32 copy of the target, same prompts, T = 0) is measured once, on the first batch size
([`~specvlm_hf.bench.exactness.measure_noise_floor`]).

Aggregation per method, temperature and batch size ([`aggregate`]): `speedup` = summed plain `generate` time / summed
method time over the same calls; `decode_speedup` = the same after subtracting the batch's time to first token
(median over repetitions) from both; `tokens_per_s`; `mean_accept_len` (bonus token included) and
`mean_accept_len_no_bonus`; `acceptance_per_depth` (SpecVLM methods); `exact_match` at `T = 0` (fraction of rows whose
tokens equal plain `generate`'s in the same repetition), `None` at `T > 0`; `divergences` at `T = 0` (each row that
differs from the plain reference, with the first differing token and the target's top-2 margin there); peak memory;
for SpecVLM methods the draft's prefill cost per prompt (`draft_prefill_ms`, `draft_prefill_tokens`,
`draft_prefill_gflops`, `draft_kv_mib`), the compressor's choices (`compressor_choices`), `time_fractions` (target
forwards / draft / the loop's own time, from `out.speculation`, time-weighted over the method's calls),
`draft_step_seconds` (mean tree expansion step: one draft forward over the frontier plus its head) and
`draft_step_ratio` (that step over plain `generate`'s decode step in the same run, [`plain_decode_step_seconds`]) and
`exact_verification`; for `oracle` records the bound `mean_accept_len * t_token / t_verify` and `fraction_of_bound`
([`oracle_bound`]).

Methods are identified by their label (`Method.label`: the method name, or `compressor:VARIANT` for each compressor
variant), so the variants of `specvlm_tree_compressor` are warmed up, interleaved and aggregated like any other method.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserValueError
from ..generation.stats import SpeculationStats
from ..models.compressor_metrics import draft_kv_bytes, draft_prefill_flops
from .exactness import PlainReference, eos_token_ids, find_divergences, generated_rows, measure_noise_floor
from .methods import ORACLE_T_NOTE, Method
from .prompts import BenchPrompt, render_batch

__all__ = [
    "RECORD_KEY_FIELDS",
    "BenchOutcome",
    "BenchSettings",
    "PeakMemory",
    "RunResult",
    "ScheduleItem",
    "aggregate",
    "interleaved_schedule",
    "oracle_bound",
    "plain_decode_step_seconds",
    "record_key",
    "rotated",
    "run_benchmark",
    "time_fractions",
]


@dataclass
class BenchSettings:
    """
    What to measure.

    Args:
        temperatures (`list[float]`): `0` = greedy; `T > 0` = sampling with `temperature=T`, `top_k`, `top_p`.
        batch_sizes (`list[int]`): batch sizes to sweep (prompts are grouped in file order).
        repeats (`int`): interleaved repetitions.
        seed (`int`): base seed; the call for batch `u`, repetition `r` uses `seed + 1000 * u + r` for every method.
        top_k (`int`): `top_k` when sampling (0 = off).
        top_p (`float`): `top_p` when sampling (1.0 = off).
        warmup_tokens (`int`): `max_new_tokens` of the warm-up calls.
        cap_new_tokens (`int`, *optional*): upper bound on every prompt's `max_new_tokens`.
        noise_floor (`bool`): measure the noise floor of plain decoding (reduced precision against a float32 copy of
            the target) when the target runs in bfloat16 / float16.
    """

    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    repeats: int = 2
    seed: int = 0
    top_k: int = 0
    top_p: float = 1.0
    warmup_tokens: int = 8
    cap_new_tokens: int | None = None
    noise_floor: bool = True

    def __post_init__(self):
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise UserValueError(f"temperatures must be non-negative, got {self.temperatures}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.repeats < 1:
            raise UserValueError(f"repeats must be positive, got {self.repeats}")


@dataclass(frozen=True)
class ScheduleItem:
    """One timed call: repetition, batch index, temperature and method."""

    repeat: int
    unit: int
    temperature: float
    method: str


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """`items` rotated left by `shift` (modulo its length)."""
    items = list(items)
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


def interleaved_schedule(
    methods: Sequence[str], n_units: int, repeats: int, temperatures: Sequence[float] = (0.0,)
) -> list[ScheduleItem]:
    """
    The order of the timed calls: for each repetition, each batch of prompts and each temperature, every method once,
    in an order rotated by `repeat + unit` (so each method takes every position across the run).

    Args:
        methods (`Sequence[str]`): method labels ([`~specvlm_hf.bench.methods.Method.label`]).
        n_units (`int`): batches of prompts.
        repeats (`int`): repetitions.
        temperatures (`Sequence[float]`, *optional*): temperatures.

    Returns:
        `list[ScheduleItem]` of length `repeats * n_units * len(temperatures) * len(methods)`.
    """
    schedule = []
    for repeat in range(repeats):
        for unit in range(n_units):
            order = rotated(methods, repeat + unit)
            for temperature in temperatures:
                schedule.extend(ScheduleItem(repeat, unit, float(temperature), name) for name in order)
    return schedule


class PeakMemory:
    """
    Peak memory of one call: CUDA `max_memory_allocated` on GPU, otherwise the process's peak resident set size,
    reset before each call through `/proc/self/clear_refs` (Linux). Where that reset is not possible the process's
    lifetime peak (`getrusage` `ru_maxrss`) is reported instead, which is then the same for every later method.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._can_reset_rss():
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_peak_rss_process_lifetime"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return PeakMemory._vm_hwm() is not None
        except OSError:
            return False

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> int:
        """Starts a new peak; returns the current usage in bytes (the baseline of the call)."""
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return int(self._vm_hwm() or 0)  # right after the reset, the high-water mark is the current RSS
        return self.read()

    def read(self) -> int:
        """Peak bytes since the last `reset`."""
        if self.kind == "cuda_max_memory_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            return int(self._vm_hwm() or 0)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class _ForwardCounter:
    """Counts forwards of the target (prefill + decode/verification steps) through a forward hook."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self.handle.remove()


@dataclass
class RunResult:
    """
    One timed `generate` call.

    Args:
        method (`str`): the method's label ([`~specvlm_hf.bench.methods.Method.label`]).
        temperature (`float`), batch_size (`int`), unit (`int`), repeat (`int`): what ran.
        seconds (`float`): end-to-end wall time of the call.
        outputs (`list[list[int]]`): generated tokens per row, up to and including the first eos.
        target_forwards (`int`): target forwards of the call (prefill included).
        stats (`SpeculationStats`, *optional*): the SpecVLM loop's statistics.
        peak_memory_bytes (`int`): peak memory of the call (see [`PeakMemory`]).
        peak_memory_increase_bytes (`int`): peak minus the usage just before the call.
    """

    method: str
    temperature: float
    batch_size: int
    unit: int
    repeat: int
    seconds: float
    outputs: list[list[int]]
    target_forwards: int
    stats: SpeculationStats | None = None
    peak_memory_bytes: int = 0
    peak_memory_increase_bytes: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.outputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_kwargs(method: Method, temperature: float, max_new_tokens: int, settings: BenchSettings) -> dict:
    kwargs = dict(method.generate_kwargs, max_new_tokens=max_new_tokens)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False)
    if method.is_specvlm:
        kwargs["return_dict_in_generate"] = True
    return kwargs


class _Caller:
    """Runs and times single calls (shared state: device, forward counter, memory probe)."""

    def __init__(self, target: Any, settings: BenchSettings):
        self.target = target
        self.settings = settings
        self.device = target.get_output_embeddings().weight.device
        self.eos_ids = eos_token_ids(target)
        self.memory = PeakMemory(self.device)
        self.counter = _ForwardCounter(target)

    def close(self) -> None:
        self.counter.close()

    def call(self, method: Method, inputs: dict, temperature: float, max_new_tokens: int, seed: int,
             reference: PlainReference | None = None):
        kwargs = _generate_kwargs(method, temperature, max_new_tokens, self.settings)
        if method.is_oracle:
            if reference is None:
                raise ValueError("the oracle method needs the plain reference of its batch (temperature 0)")
            from ..generation.drafters import ReplayDrafterFactory

            kwargs["tree_drafter"] = ReplayDrafterFactory(reference.replay)
        torch.manual_seed(seed)
        baseline = self.memory.reset()
        self.counter.count = 0
        _sync(self.device)
        start = time.perf_counter()
        out = self.target.generate(**inputs, **kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        peak = self.memory.read()
        sequences = out.sequences if kwargs.get("return_dict_in_generate") else out
        stats = getattr(out, "speculation", None) if method.is_specvlm else None
        rows = generated_rows(sequences, inputs["input_ids"].shape[1], self.eos_ids)
        return seconds, rows, self.counter.count, stats, peak, max(peak - baseline, 0)

    def reference(self, inputs: dict, max_new_tokens: int) -> PlainReference:
        """The untimed plain greedy call of a batch, with its logits reduced to margins."""
        return PlainReference.run(self.target, inputs, max_new_tokens, self.eos_ids)

    def ttft(self, inputs: dict) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.target.generate(**inputs, max_new_tokens=1, do_sample=False)
        _sync(self.device)
        return time.perf_counter() - start


#: The fields that identify a result record: one record per method (compressor variant, oracle depth), temperature and
#: batch size. `specvlm bench --resume` skips the records whose key is already in `results.json`.
RECORD_KEY_FIELDS = ("method", "variant", "oracle_depth", "temperature", "batch_size")


def record_key(record: Mapping[str, Any]) -> tuple[str, str | None, int | None, float, int]:
    """
    The identity of a result record: `(method, variant, oracle_depth, temperature, batch_size)` (see
    [`RECORD_KEY_FIELDS`]; `variant` and `oracle_depth` are `None` where they do not apply, or in records written
    before the field existed).

    Example:

    ```python
    >>> record_key({"method": "specvlm_tree", "temperature": 0, "batch_size": 1, "speedup": 0.6})
    ('specvlm_tree', None, None, 0.0, 1)
    >>> record_key({"method": "oracle", "oracle_depth": 4, "temperature": 0, "batch_size": 1})
    ('oracle', None, 4, 0.0, 1)
    ```
    """
    depth = record.get("oracle_depth")
    return (str(record["method"]), record.get("variant"), None if depth is None else int(depth),
            float(record["temperature"]), int(record["batch_size"]))


def _method_key(method: Method, temperature: float, batch_size: int) -> tuple[str, str | None, int | None, float, int]:
    return method.name, method.variant, method.oracle_depth, float(temperature), int(batch_size)


@dataclass
class BenchOutcome:
    """
    What [`run_benchmark`] measured.

    Args:
        records (`list[dict]`): the new records (see [`aggregate`]).
        runs (`list[RunResult]`): every timed call.
        ttfts (`dict[tuple[int, int], list[float]]`): time-to-first-token samples per `(batch_size, unit)`.
        references (`dict[tuple[int, int], PlainReference]`): the plain reference of each `(batch_size, unit)` that
            ran at temperature 0.
        noise_floor (`dict`, *optional*): [`~specvlm_hf.bench.exactness.measure_noise_floor`]'s result (`None` in
            float32, when off, or when no temperature-0 group ran).
    """

    records: list[dict]
    runs: list[RunResult]
    ttfts: dict[tuple[int, int], list[float]]
    references: dict[tuple[int, int], PlainReference] = field(default_factory=dict)
    noise_floor: dict | None = None

    def __iter__(self):  # `records, runs, ttfts = run_benchmark(...)`, as before the outcome had more fields
        return iter((self.records, self.runs, self.ttfts))


def run_benchmark(
    target: Any,
    processor: Any,
    prompts: Sequence[BenchPrompt],
    methods: Sequence[Method],
    settings: BenchSettings,
    *,
    progress: bool = True,
    done: Collection[tuple] = (),
    on_records: Callable[[list[dict]], None] | None = None,
) -> BenchOutcome:
    """
    Runs the whole benchmark (see the module docstring for the protocol).

    Records are finished one group (batch size × temperature) at a time; `on_records` receives each group as soon as
    it is aggregated, so that a caller can save partial results before the next group starts.

    Args:
        target: the target model.
        processor: its processor (or tokenizer for text-only targets).
        prompts (`Sequence[BenchPrompt]`): the prompts.
        methods (`Sequence[Method]`): from [`~specvlm_hf.bench.methods.build_methods`]; `generate` must be first.
        settings ([`BenchSettings`]): temperatures, batch sizes, repetitions, sampling settings.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar on stderr.
        done (`Collection[tuple]`, *optional*): [`record_key`]s of records measured before (e.g. by an interrupted
            run): they are neither run again nor returned. Plain `generate` still runs in a group where another record
            is missing, as the baseline of its ratios; a group with nothing missing is skipped entirely.
        on_records (`Callable[[list[dict]], None]`, *optional*): called with the new records of each finished group.

    Returns:
        [`BenchOutcome`]: the new records (one dict per method × temperature × batch size, see [`aggregate`]), every
        [`RunResult`], the time-to-first-token samples per `(batch_size, unit)`, the plain references of the
        temperature-0 groups and the noise floor (unpacks as `records, runs, ttfts`).
    """
    from tqdm.auto import tqdm

    if not methods or methods[0].name != "generate":
        raise ValueError("the first method must be plain `generate` (the baseline)")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique (give compressor variants distinct names), got {labels}")
    done = set(done)
    caller = _Caller(target, settings)
    outcome = BenchOutcome([], [], {})
    floor_inputs = None  # (batch size, rendered batches, max_new) of the noise floor: the first batch size at T = 0
    try:
        for batch_size in settings.batch_sizes:
            units = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
            inputs: list[dict] | None = None  # rendered once per batch size, when a group of it first runs
            max_new = [max(p.max_new_tokens for p in unit) for unit in units]
            if settings.cap_new_tokens:
                max_new = [min(m, settings.cap_new_tokens) for m in max_new]
            for temperature in settings.temperatures:
                missing = [m for m in methods if _method_key(m, temperature, batch_size) not in done]
                if not missing:
                    continue
                # plain generate is the baseline of every ratio, so it runs whenever another method does; a record of
                # an unavailable method (or of the oracle at T > 0) needs no call
                wanted = {id(m) for m in missing if m.available and m.runs_at_temperature(temperature)}
                active = [m for m in methods if id(m) in wanted or m is methods[0]] if wanted else []
                if active and inputs is None:
                    inputs = [render_batch(processor, unit, caller.device, target.dtype) for unit in units]
                group_runs, group_ttfts, references = _run_group(caller, active, inputs, max_new, temperature,
                                                                 batch_size, settings, tqdm, progress)
                outcome.runs += group_runs
                for unit, values in group_ttfts.items():
                    outcome.ttfts.setdefault((batch_size, unit), []).extend(values)
                for unit, reference in references.items():
                    outcome.references[(batch_size, unit)] = reference
                if references and floor_inputs is None:
                    floor_inputs = (batch_size, inputs, max_new, references)
                group = aggregate(group_runs, missing, [temperature], batch_size, group_ttfts, caller.memory.kind,
                                  references=references or None)
                outcome.records += group
                if on_records is not None:
                    on_records(group)
    finally:
        caller.close()
    if settings.noise_floor and floor_inputs is not None:  # last: its float32 copy never overlaps a timed call
        batch_size, inputs, max_new, references = floor_inputs
        outcome.noise_floor = measure_noise_floor(target, inputs, max_new, references, batch_size, len(prompts))
    return outcome


def _run_group(
    caller: _Caller,
    active: list[Method],
    inputs: list[dict] | None,
    max_new: list[int],
    temperature: float,
    batch_size: int,
    settings: BenchSettings,
    tqdm: Any,
    progress: bool,
) -> tuple[list[RunResult], dict[int, list[float]], dict[int, PlainReference]]:
    """Plain references (T = 0), warm-up, time to first token and the interleaved timed calls of one batch size and
    temperature; returns the runs, the time-to-first-token samples and the references per batch of prompts."""
    ttfts: dict[int, list[float]] = {}
    references: dict[int, PlainReference] = {}
    if not active or inputs is None:
        return [], ttfts, references
    n_references = len(inputs) if temperature == 0 else 0
    bar = tqdm(total=n_references + len(active) + settings.repeats * len(inputs) * (len(active) + 1),
               desc=f"bench batch={batch_size} T={temperature:g}", disable=not progress, file=sys.stderr, leave=True)
    for unit in range(n_references):
        bar.set_postfix_str(f"plain reference with logits, batch {unit}")
        references[unit] = caller.reference(inputs[unit], max_new[unit])
        bar.update(1)
    for method in active:
        if not method.runs_at(batch_size):  # already refused at this batch size (at another temperature)
            bar.update(1)
            continue
        bar.set_postfix_str(f"warm-up {method.label}")
        try:
            caller.call(method, inputs[0], temperature, settings.warmup_tokens, settings.seed,
                        reference=references.get(0))
        except ValueError as error:
            if not method.is_transformers_assisted:
                raise
            method.unsupported_batch_sizes[batch_size] = str(error)
        bar.update(1)
    runnable = [m for m in active if m.runs_at(batch_size)]
    by_label = {m.label: m for m in runnable}
    schedule = interleaved_schedule([m.label for m in runnable], len(inputs), settings.repeats, [temperature])
    bar.total = n_references + len(active) + len(schedule) + settings.repeats * len(inputs)
    runs = []
    current = None
    for item in schedule:
        if (item.repeat, item.unit) != current:
            current = (item.repeat, item.unit)
            bar.set_postfix_str(f"time to first token, batch {item.unit}")
            ttfts.setdefault(item.unit, []).append(caller.ttft(inputs[item.unit]))
            bar.update(1)
        bar.set_postfix_str(f"{item.method} batch {item.unit} rep {item.repeat}")
        seed = settings.seed + 1000 * item.unit + item.repeat
        seconds, rows, forwards, stats, peak, increase = caller.call(
            by_label[item.method], inputs[item.unit], item.temperature, max_new[item.unit], seed,
            reference=references.get(item.unit),
        )
        runs.append(RunResult(item.method, item.temperature, batch_size, item.unit, item.repeat, seconds, rows,
                              forwards, stats, peak, increase))
        bar.update(1)
    bar.close()
    return runs, ttfts, references


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 and numerator > 0 else None


#: Per-prompt draft prefill costs of SpecVLM methods (`None` for the other methods).
DRAFT_PREFILL_KEYS = ("draft_prefill_ms", "draft_prefill_tokens", "draft_prefill_gflops", "draft_kv_mib")


def draft_prefill_costs(runs: Sequence[RunResult], draft: Any = None) -> dict[str, Any]:
    """
    Draft prefill cost of SpecVLM calls, as means per prompt (batch row) over `runs`.

    `draft_prefill_ms` and `draft_prefill_tokens` come from each call's `SpeculationStats` (`draft_prefill_seconds`,
    `draft_prefill_tokens`, summed over the rows of a call); `draft_prefill_gflops` and `draft_kv_mib` are computed
    from those token counts with [`~specvlm_hf.models.compressor_metrics.draft_prefill_flops`] and
    [`~specvlm_hf.models.compressor_metrics.draft_kv_bytes`] for `draft`'s configuration and dtype (`None` without a
    draft). The FLOPs are quadratic in the prefill length, so at batch size > 1 they are computed from each call's mean
    row length (exact at batch size 1). A row that ends at its first token never runs the draft and counts as 0.
    `compressor_choices` sums the compressor's choice histograms (`{}` when no compressor ran).

    Returns:
        `dict` with `draft_prefill_ms`, `draft_prefill_tokens`, `draft_prefill_gflops`, `draft_kv_mib` (floats or
        `None` when no row ran) and `compressor_choices`.
    """
    rows = sum(len(r.outputs) for r in runs if r.stats is not None)
    choices: dict[str, int] = {}
    if not rows:
        return {**dict.fromkeys(DRAFT_PREFILL_KEYS), "compressor_choices": choices}
    seconds = tokens = flops = 0.0
    for r in runs:
        if r.stats is None:
            continue
        seconds += r.stats.draft_prefill_seconds
        tokens += r.stats.draft_prefill_tokens
        if draft is not None:
            n_rows = max(len(r.outputs), 1)
            flops += n_rows * draft_prefill_flops(round(r.stats.draft_prefill_tokens / n_rows), draft.config)
        for name, count in r.stats.compressor_choices.items():
            choices[name] = choices.get(name, 0) + count
    kv_mib = None
    if draft is not None:
        dtype = next(draft.parameters()).dtype
        kv_mib = draft_kv_bytes(int(tokens), draft.config, dtype) / rows / 2**20
    return {
        "draft_prefill_ms": 1000 * seconds / rows,
        "draft_prefill_tokens": tokens / rows,
        "draft_prefill_gflops": flops / rows / 1e9 if draft is not None else None,
        "draft_kv_mib": kv_mib,
        "compressor_choices": choices,
    }


def time_fractions(stats: Sequence[SpeculationStats]) -> dict[str, float] | None:
    """
    Time-weighted shares of the calls' wall time: `target_forward` (the target's forwards, prefill included), `draft`
    (the draft's forwards) and `loop` (the rest: tree building, masks, acceptance, cache compaction, Python), each the
    sum of its seconds over the calls divided by the sum of the calls' `total_seconds`; they sum to 1.

    Returns:
        `dict[str, float]`, or `None` when no call recorded its time.
    """
    total = sum(getattr(s, "total_seconds", 0.0) for s in stats)
    if total <= 0:
        return None
    target = min(sum(getattr(s, "target_seconds", 0.0) for s in stats) / total, 1.0)
    draft = min(sum(getattr(s, "draft_seconds", 0.0) for s in stats) / total, 1.0 - target)
    return {"target_forward": target, "draft": draft, "loop": 1.0 - target - draft}


#: The fields of an `oracle` record's bound (`None` elsewhere); see [`oracle_bound`].
ORACLE_KEYS = ("t_token_seconds", "t_verify_seconds", "bound", "fraction_of_bound", "decode_fraction_of_bound",
               "end_to_end_bound", "fraction_of_end_to_end_bound")


def plain_decode_step_seconds(paired: Sequence[tuple[RunResult, RunResult]], ttft_median: Mapping[int, float]) -> float | None:
    """
    Plain `generate`'s time per decode step over the calls of `paired`: (wall time - time to first token) / decode
    steps after the first token, one step per token of the call's longest row (a batched step decodes every row).
    `None` when no call decoded past its first token.
    """
    seconds = sum(p.seconds - ttft_median.get(p.unit, 0.0) for _, p in paired)
    steps = sum(max(max((len(row) for row in p.outputs), default=0) - 1, 0) for _, p in paired)
    return seconds / steps if steps and seconds > 0 else None


def oracle_bound(
    paired: Sequence[tuple[RunResult, RunResult]],
    stats: SpeculationStats,
    ttft_median: Mapping[int, float],
    speedup: float | None,
    decode_speedup: float | None,
) -> dict[str, float | None]:
    """
    The speedup bound of a perfect draft, measured in the same run: `bound = tau * t_token / t_verify`.

    - `tau`: the oracle's `mean_accept_len` (tokens per verification forward, bonus included);
    - `t_token`: plain `generate`'s decode time per token over the same calls: (wall time - time to first token) /
      tokens decoded after the first one of each row;
    - `t_verify`: the oracle's time per verification forward: (`target_seconds` - `target_prefill_seconds`) /
      `target_forwards` of its `out.speculation`.

    The bound is the decode-rate ratio the loop would reach if drafting and the loop's own work were free;
    `decode_fraction_of_bound = decode_speedup / bound` says how much of it the loop keeps, and
    `fraction_of_bound = speedup / bound` compares the end-to-end speedup with it (the prefill, which no draft
    shortens, pulls this one down).

    The end-to-end version of the same bound counts the prefill as plain generate pays it:
    `end_to_end_bound = sum(plain seconds) / (sum(time to first token) + verification seconds)`, the speedup of a
    call whose drafting and loop cost nothing (prefill, then the oracle's own verification forwards); and
    `fraction_of_end_to_end_bound = speedup / end_to_end_bound`.

    Args:
        paired (`Sequence[tuple[RunResult, RunResult]]`): the oracle's calls, each with plain `generate`'s call of the
            same repetition and batch.
        stats (`SpeculationStats`): the oracle calls' statistics, merged.
        ttft_median (`Mapping[int, float]`): time to first token per batch of prompts.
        speedup (`float`, *optional*), decode_speedup (`float`, *optional*): the oracle record's speedups.

    Returns:
        `dict` with [`ORACLE_KEYS`] (`None` where a quantity is undefined, e.g. no verification forward).
    """
    decode_seconds = sum(p.seconds - ttft_median.get(p.unit, 0.0) for _, p in paired)
    decode_tokens = sum(max(p.new_tokens - len(p.outputs), 0) for _, p in paired)
    t_token = decode_seconds / decode_tokens if decode_tokens and decode_seconds > 0 else None
    verify_seconds = stats.target_seconds - getattr(stats, "target_prefill_seconds", 0.0)
    t_verify = verify_seconds / stats.target_forwards if stats.target_forwards and verify_seconds > 0 else None
    tau = stats.mean_accept_len
    bound = tau * t_token / t_verify if tau and t_token and t_verify else None
    plain_seconds = sum(p.seconds for _, p in paired)
    prefill_seconds = sum(ttft_median.get(p.unit, 0.0) for _, p in paired)
    end_to_end = (plain_seconds / (prefill_seconds + verify_seconds)
                  if bound and plain_seconds > 0 and prefill_seconds + verify_seconds > 0 else None)
    return {
        "t_token_seconds": t_token,
        "t_verify_seconds": t_verify,
        "bound": bound,
        "fraction_of_bound": speedup / bound if speedup and bound else None,
        "decode_fraction_of_bound": decode_speedup / bound if decode_speedup and bound else None,
        "end_to_end_bound": end_to_end,
        "fraction_of_end_to_end_bound": speedup / end_to_end if speedup and end_to_end else None,
    }


def aggregate(
    runs: Sequence[RunResult],
    methods: Sequence[Method],
    temperatures: Sequence[float],
    batch_size: int,
    ttft: dict[int, list[float]],
    memory_kind: str = "cpu_peak_rss",
    references: Mapping[int, PlainReference] | None = None,
) -> list[dict]:
    """
    One record per method and temperature for one batch size.

    Every ratio is taken over the calls (repetition, batch of prompts) that both the method and plain `generate` ran.
    Runs are matched to methods by label ([`~specvlm_hf.bench.methods.Method.label`]).

    Args:
        references (`Mapping[int, PlainReference]`, *optional*): the plain reference of each batch of prompts at
            temperature 0; with it, every temperature-0 record gets `divergences`
            ([`~specvlm_hf.bench.exactness.find_divergences`]).

    Returns:
        `list[dict]` with keys `method`, `variant`, `oracle_depth`, `temperature`, `batch_size`, `available`, `note`,
        `speedup`, `decode_speedup`, `speedup_tokens_per_s`, `seconds`, `generate_seconds`, `new_tokens`,
        `tokens_per_s`, `ttft_seconds`, `mean_accept_len`, `mean_accept_len_no_bonus`, `acceptance_per_depth`,
        `target_forwards`, `exact_match`, `exact_match_per_row` (at temperature 0, one bool per row of every paired
        call: equal to plain `generate`'s row), `identical_to_generate`, `speedup_identical_calls` and
        `identical_calls` (at temperature 0: the speedup over only the calls whose every row equals plain `generate`'s,
        a like-for-like ratio when some outputs differ in length, and how many calls that is), `call_seconds` (per
        paired call: `[repeat, unit, method seconds, plain seconds, identical]`, `identical` `None` when sampling),
        `divergences` (a list at temperature 0 with
        `references`, else `None`), `peak_memory_mib`, `peak_memory_increase_mib`, `peak_memory_kind`, `calls`,
        `tree_top_k`, `tree_depth`, `tree_total_tokens`; for SpecVLM methods (`None` / `{}` otherwise) the per-prompt
        draft prefill costs of [`draft_prefill_costs`] (`draft_prefill_ms`, `draft_prefill_tokens`,
        `draft_prefill_gflops`, `draft_kv_mib`, `compressor_choices`), `time_fractions` ([`time_fractions`]) and
        `exact_verification` (whether every call verified with exact row-wise attention), `batched_forwards`
        (verification forwards that verified every unfinished row of a batch at once; 0 when rows were verified one
        after another); for `oracle` records the
        [`ORACLE_KEYS`] of [`oracle_bound`].
    """
    ttft_median = {unit: statistics.median(values) for unit, values in ttft.items() if values}
    records = []
    for temperature in temperatures:
        plain = {(r.repeat, r.unit): r for r in runs if r.method == "generate" and r.temperature == temperature}
        for method in methods:
            note = method.unsupported_batch_sizes.get(batch_size, method.note) if method.available else method.note
            if not method.runs_at_temperature(temperature):
                note = ORACLE_T_NOTE
            record: dict[str, Any] = {
                "method": method.name,
                "variant": method.variant,
                "oracle_depth": method.oracle_depth,
                "temperature": float(temperature),
                "batch_size": batch_size,
                "available": method.runs_at(batch_size) and method.runs_at_temperature(temperature),
                "note": note,
                "tree_top_k": method.tree.top_k if method.tree else None,
                "tree_depth": method.tree.depth if method.tree else None,
                "tree_total_tokens": method.tree.total_tokens if method.tree else None,
                **dict.fromkeys(DRAFT_PREFILL_KEYS),
                "compressor_choices": {} if method.is_specvlm else None,
                "time_fractions": None,
                "exact_verification": None,
                "batched_forwards": None,
                "undrafted_fraction": None,
                "draft_step_seconds": None,
                "draft_step_ratio": None,
                "exact_match_per_row": None,
                **(dict.fromkeys(ORACLE_KEYS) if method.is_oracle else {}),
            }
            mine = [r for r in runs if r.method == method.label and r.temperature == temperature]
            paired = [(r, plain[(r.repeat, r.unit)]) for r in mine if (r.repeat, r.unit) in plain]
            if not paired:
                record.update(dict.fromkeys(
                    ("speedup", "decode_speedup", "speedup_tokens_per_s", "seconds", "generate_seconds", "new_tokens",
                     "tokens_per_s", "ttft_seconds", "mean_accept_len", "mean_accept_len_no_bonus",
                     "acceptance_per_depth", "target_forwards", "exact_match", "identical_to_generate",
                     "speedup_identical_calls", "identical_calls", "call_seconds",
                     "divergences", "peak_memory_mib", "peak_memory_increase_mib", "calls")
                ))
                record["peak_memory_kind"] = memory_kind
                records.append(record)
                continue
            seconds = sum(r.seconds for r, _ in paired)
            plain_seconds = sum(p.seconds for _, p in paired)
            first = sum(ttft_median.get(r.unit, 0.0) for r, _ in paired)
            tokens = sum(r.new_tokens for r, _ in paired)
            plain_tokens = sum(p.new_tokens for _, p in paired)
            rows = [(a, b) for r, p in paired for a, b in zip(r.outputs, p.outputs)]
            identical = sum(a == b for a, b in rows) / len(rows) if rows else None
            call_identical = [list(r.outputs) == list(p.outputs) for r, p in paired]
            same = [pair for pair, equal in zip(paired, call_identical) if equal]
            accept = accept_no_bonus = per_depth = stats = None
            if method.is_specvlm:
                stats = SpeculationStats()
                for r, _ in paired:
                    if r.stats is not None:
                        stats = stats.merge(r.stats)
                accept, accept_no_bonus = stats.mean_accept_len, stats.mean_accepted_draft_tokens
                per_depth = stats.acceptance_per_depth
                if method.tree is not None and stats.target_forwards:  # depths never reached: 0, not missing
                    per_depth = per_depth + [0.0] * (method.tree.depth - len(per_depth))
                record.update(draft_prefill_costs([r for r, _ in paired], method.draft))
                call_stats = [r.stats for r, _ in paired if r.stats is not None]
                record.update(
                    time_fractions=time_fractions(call_stats),
                    exact_verification=(all(bool(getattr(s, "exact_verification", False)) for s in call_stats)
                                        if call_stats else None),
                    batched_forwards=stats.batched_forwards,
                    undrafted_fraction=(getattr(stats, "undrafted_cycles", 0) / stats.target_forwards
                                        if stats.target_forwards else None),
                )
                step = stats.mean_draft_step_seconds
                plain_step = plain_decode_step_seconds(paired, ttft_median)
                record.update(draft_step_seconds=step,
                              draft_step_ratio=step / plain_step if step and plain_step else None)
                if batch_size > 1:
                    how = ("all unfinished rows verified in one forward per cycle" if stats.batched_forwards
                           else "rows verified one after another after one batched prefill")
                    note = "; ".join(filter(None, [note, how]))
                    record["note"] = note
            elif batch_size == 1:
                # tokens per verification forward: the prefill forward emits the first token of each call
                emitted = sum(max(r.new_tokens - 1, 0) for r, _ in paired)
                verifications = sum(max(r.target_forwards - 1, 0) for r, _ in paired)
                if verifications:
                    accept = emitted / verifications
                    accept_no_bonus = accept - 1.0
            record.update(
                speedup=_ratio(plain_seconds, seconds),
                decode_speedup=_ratio(plain_seconds - first, seconds - first),
                speedup_tokens_per_s=_ratio(tokens / seconds, plain_tokens / plain_seconds) if plain_tokens else None,
                seconds=seconds,
                generate_seconds=plain_seconds,
                new_tokens=tokens,
                tokens_per_s=tokens / seconds if seconds > 0 else None,
                ttft_seconds=first / len(paired),
                mean_accept_len=accept,
                mean_accept_len_no_bonus=accept_no_bonus,
                acceptance_per_depth=per_depth,
                target_forwards=sum(r.target_forwards for r, _ in paired),
                exact_match=identical if temperature == 0 else None,
                exact_match_per_row=[a == b for a, b in rows] if temperature == 0 else None,
                identical_to_generate=identical,
                speedup_identical_calls=(_ratio(sum(p.seconds for _, p in same), sum(r.seconds for r, _ in same))
                                         if temperature == 0 and same else None),
                identical_calls=len(same) if temperature == 0 else None,
                call_seconds=[[r.repeat, r.unit, r.seconds, p.seconds, equal if temperature == 0 else None]
                              for (r, p), equal in zip(paired, call_identical)],
                divergences=(find_divergences(((r.unit, r.outputs) for r, _ in paired), references, batch_size)
                             if temperature == 0 and references else None),
                peak_memory_mib=max(r.peak_memory_bytes for r, _ in paired) / 2**20,
                peak_memory_increase_mib=max(r.peak_memory_increase_bytes for r, _ in paired) / 2**20,
                peak_memory_kind=memory_kind,
                calls=len(paired),
            )
            if method.is_oracle and stats is not None:
                record.update(oracle_bound(paired, stats, ttft_median, record["speedup"], record["decode_speedup"]))
            records.append(record)
    return records
