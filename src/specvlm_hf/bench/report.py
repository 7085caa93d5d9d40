"""Writing `specvlm bench` results: `results.json`, `meta.json`, `results.md` and `results.png`.

`results.json` is a list of records (one per method × temperature × batch size, see
[`~specvlm_hf.bench.runner.aggregate`]), rewritten atomically ([`write_json_atomic`]: a temporary file in the same
folder, then `os.replace`) after every finished group of records, so that it is always valid JSON and an interrupted
run keeps what it finished (`specvlm bench --resume` runs the rest); `meta.json` holds the run's metadata (status,
date, hardware, versions, models, prompts, settings, conventions) and the tree calibration, written before the models
load and updated as the run goes; `results.md` renders both as Markdown (with an "Exactness (T = 0)" section: the
noise floor and each method's divergences from plain `generate`; an "Oracle (perfect draft)" table when `oracle` ran;
an "Ablation: elastic compressor" table when `specvlm_tree_compressor` variants ran); `results.png` draws the
speedups, the acceptance per depth and, when calibrated, the cost curve and the modelled speedup by tree budget. Both
are written at the end, and on an interrupt.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserValueError
from .methods import record_label

__all__ = [
    "CONVENTIONS",
    "common_identical_speedups",
    "hardware_info",
    "plot_results",
    "prepare_output_dir",
    "read_previous_run",
    "render_markdown",
    "software_versions",
    "write_json_atomic",
    "write_records",
    "write_results",
]

RESULTS_FILE = "results.json"
META_FILE = "meta.json"

CONVENTIONS = {
    "speedup": "summed plain generate wall time / summed method wall time over the same calls (vision encoding and "
    "prefill included)",
    "decode_speedup": "the same after subtracting each batch's time to first token (plain generate with "
    "max_new_tokens=1, median over repetitions) from both; a method's own prefill extras stay in its time",
    "speedup_tokens_per_s": "method tokens/s / plain generate tokens/s (differs from speedup when outputs differ in "
    "length, e.g. with sampling)",
    "speedup_identical_calls": "at temperature 0: speedup over only the calls whose output equals plain generate's "
    "(identical_calls of calls), the like-for-like ratio when some outputs differ (reduced precision near-ties); "
    "results.md also compares every method on the calls that all of them reproduced exactly",
    "mean_accept_len": "tokens emitted per target verification forward, bonus token included (1.0 = no draft token "
    "accepted); SpecVLM methods from out.speculation; transformers methods at batch size 1 from a forward counter: "
    "(new tokens - 1) / (target forwards - 1)",
    "mean_accept_len_no_bonus": "accepted draft tokens per verification forward (bonus excluded); for transformers "
    "methods mean_accept_len - 1",
    "acceptance_per_depth": "fraction of verification cycles whose accepted path reached draft depth d (index 0 = "
    "depth 1); SpecVLM methods only",
    "exact_match": "at temperature 0, fraction of output rows token-identical to plain generate's in the same "
    "repetition; null at T > 0 (see identical_to_generate)",
    "peak_memory_mib": "peak memory of one call in MiB (2**20 bytes): CUDA max_memory_allocated, or the process's "
    "peak resident set size reset before each call (/proc/self/clear_refs)",
    "variant": "specvlm_tree_compressor only: the compressor variant's name (--compressor-draft NAME=PATH), "
    "labelled compressor:NAME; every variant runs with specvlm_tree's tree knobs",
    "draft_prefill_ms": "SpecVLM methods: wall time of the draft's prefill (compressor included) per prompt, mean over "
    "calls (out.speculation.draft_prefill_seconds)",
    "draft_prefill_tokens": "SpecVLM methods: positions the draft's prefill wrote to its KV cache per prompt (fewer "
    "with a visual compressor), mean over calls",
    "draft_prefill_gflops": "SpecVLM methods: modelled FLOPs (2 per multiply-add) of that prefill per prompt, from "
    "draft_prefill_tokens and the draft config (specvlm_hf.models.compressor_metrics.draft_prefill_flops; at batch "
    "size > 1 from each call's mean row length)",
    "draft_kv_mib": "SpecVLM methods: the draft's KV cache after the prefill per prompt, in MiB "
    "(compressor_metrics.draft_kv_bytes, draft dtype)",
    "compressor_choices": "SpecVLM methods: the compressor's choices summed over calls (primitive -> count; 'none' "
    "for concat mode); {} when no compressor ran",
    "divergences": "at temperature 0, one entry per output row not token-identical to the plain reference (plain "
    "generate of the same batch, run once untimed with output_logits=True): prompt (index in the prompts file), row "
    "(in its batch), first_diff (generated-token index), margin (the target's top-1 minus top-2 logit there under "
    "plain decoding; a few hundredths = a near tie that rounding can flip) and diverging_runs; [] when every row is "
    "identical; null at T > 0",
    "noise_floor": "meta.json, bfloat16/float16 runs: plain greedy decoding in the bench dtype against plain greedy "
    "decoding of a float32 copy of the target (same weights, upcast; same prompts and batches, T = 0): "
    "diverging_prompts / prompts = rate, with each divergence (margin in the bench dtype, margin_float32)",
    "time_fractions": "SpecVLM methods: shares of the calls' wall time in the target's forwards (target_forward, "
    "prefill included), the draft's forwards (draft) and the loop's own work (loop), each summed over the calls and "
    "divided by their summed out.speculation.total_seconds; they sum to 1",
    "exact_verification": "SpecVLM methods: whether every call verified with the exact row-wise attention "
    "(out.speculation.exact_verification; bf16/fp16 greedy output then equals plain decoding bit for bit)",
    "oracle_depth": "oracle only: the replayed chain length (a perfect draft: plain generate's own greedy output as a "
    "chain plus one decoy per depth, ReplayDrafterFactory); T = 0 only",
    "bound": "oracle only: mean_accept_len * t_token / t_verify, the decode speedup a perfect draft gives when "
    "drafting and the loop cost nothing; t_token_seconds = plain generate's (wall time - time to first token) / "
    "tokens after each row's first, t_verify_seconds = (target_seconds - target_prefill_seconds) / target_forwards "
    "of the oracle's out.speculation, both from the same run",
    "fraction_of_bound": "oracle only: speedup / bound (decode_fraction_of_bound: decode_speedup / bound)",
    "undrafted_fraction": "SpecVLM methods: fraction of verification cycles whose tree held no draft node (adaptive "
    "trees found drafting not worth its cost and verified the n-gram branch or the root alone; "
    "out.speculation.undrafted_cycles / target_forwards)",
    "draft_step_seconds": "SpecVLM methods: mean wall time of one tree expansion step (a draft forward over the "
    "tree's frontier plus its LM head; out.speculation.draft_step_seconds / draft_steps)",
    "draft_step_ratio": "SpecVLM methods: draft_step_seconds / plain generate's decode step in the same run ((wall "
    "time - time to first token) / steps after the first token, one step per token of a call's longest row)",
    "end_to_end_bound": "oracle only: the same bound with the prefill counted as plain generate pays it: summed plain "
    "wall time / (summed time to first token + the oracle's verification seconds), the end-to-end speedup of a call "
    "whose drafting and loop cost nothing; fraction_of_end_to_end_bound = speedup / end_to_end_bound",
}


def hardware_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Platform, CPU model (from `/proc/cpuinfo`), core count, torch threads and, on CUDA, the GPU name."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def software_versions() -> dict[str, str | None]:
    """Versions of python, torch, transformers and specvlm-hf."""
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specvlm_hf": __version__,
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _clean(value: Any) -> Any:
    """JSON-safe copy (NaN/inf -> None, tuples -> lists, paths -> str)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def render_markdown(records: list[dict], meta: dict) -> str:
    """Markdown report: metadata, conventions, one table per batch size, and the calibration."""
    lines = ["# specvlm bench results", ""]
    hw, sw = meta.get("hardware", {}), meta.get("versions", {})
    gpu = f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    hardware = f"{hw.get('cpu_model')} ({hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch threads){gpu}"
    software = f"torch {sw.get('torch')}, transformers {sw.get('transformers')}, specvlm-hf {sw.get('specvlm_hf')}"
    reason = f" ({meta['dtype_reason']})" if meta.get("dtype_reason") else ""
    settings = (
        f"Device {meta.get('device')}, dtype {meta.get('dtype')}{reason}; prompts: {meta.get('prompts_file')} "
        f"({meta.get('num_prompts')} prompts); repetitions: {meta.get('repeats')}; sampling at T > 0: "
        f"top_k={meta.get('top_k')}, top_p={meta.get('top_p')}"
    )
    lines += [
        f"- Date: {meta.get('date')}",
        f"- Hardware: {hardware}",
        f"- Software: {software}",
        f"- Target: {meta.get('target')} · draft: {meta.get('draft')} · assistant: {meta.get('assistant')}",
        f"- {settings}",
        "",
    ]
    for batch_size in sorted({r["batch_size"] for r in records}):
        header = (
            "| Method | T | Speedup | Decode speedup | Tokens/s | Accept len (incl. bonus) | (excl.) | Exact match "
            "| Divergences | Time target / draft / loop | Draft step / decode step | Exact verif. | Undrafted cycles "
            "| Peak MiB (+ over baseline) | Tree (k/depth/nodes) | Note |"
        )
        lines += [f"## Batch size {batch_size}", "", header, "|---" * 16 + "|"]
        for r in (r for r in records if r["batch_size"] == batch_size):
            tree = f"{r['tree_top_k']}/{r['tree_depth']}/{r['tree_total_tokens']}" if r.get("tree_depth") else "–"
            note = (r.get("note") or "").replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {record_label(r)} | {r['temperature']:g} | {_fmt(r.get('speedup'), suffix='×')} "
                f"| {_fmt(r.get('decode_speedup'), suffix='×')} | {_fmt(r.get('tokens_per_s'), 1)} "
                f"| {_fmt(r.get('mean_accept_len'))} | {_fmt(r.get('mean_accept_len_no_bonus'))} "
                f"| {_fmt(r.get('exact_match'))} | {_divergence_summary(r.get('divergences'))} "
                f"| {_fractions(r.get('time_fractions'))} | {_fmt(r.get('draft_step_ratio'), 3)} "
                f"| {_yes_no(r.get('exact_verification'))} "
                f"| {_fmt(r.get('undrafted_fraction'))} | {_fmt(r.get('peak_memory_mib'), 0)} (+{_fmt(r.get('peak_memory_increase_mib'), 1)}) | {tree} "
                f"| {note} |"
            )
        lines.append("")
    lines += _exactness_section(records, meta)
    lines += _oracle_table(records)
    lines += _ablation_table(records)
    calibration = meta.get("calibration")
    if calibration:
        chosen = calibration["chosen"]
        choice = calibration["choice"]
        summary = (
            f"Chosen: `tree_top_k={chosen['tree_top_k']}`, `tree_depth={chosen['tree_depth']}`, "
            f"`tree_total_tokens={chosen['tree_total_tokens']}` (modelled speedup "
            f"{choice['predicted_speedup']:.2f}×, {choice['expected_tokens']:.2f} tokens per cycle). Pilot: the "
            f"first {calibration['pilot_prompts']} prompt(s), {calibration['pilot_max_new_tokens']} tokens, depth "
            f"{calibration['pilot_depth']}, temperature 0; plain decoding "
            f"{1000 * calibration['plain_token_seconds']:.1f} ms/token; loop overhead "
            f"{1000 * calibration['overhead_seconds']:.1f} ms/cycle; calibration took {calibration['seconds']:.0f} s."
        )
        lines += [
            "## Tree calibration",
            "",
            summary,
            "",
            "| tree_total_tokens (pilot) | tokens per cycle | measured ms per cycle | acceptance per depth |",
            "|---|---|---|---|",
        ]
        for budget, accept in calibration["pilot_mean_accept_len"].items():
            per_cycle = calibration["pilot_seconds_per_cycle"].get(budget)
            depth = ", ".join(f"{a:.2f}" for a in calibration["pilot_acceptance"][budget])
            lines.append(f"| {budget} | {accept:.2f} | {_fmt(per_cycle * 1000 if per_cycle else None, 1)} | {depth} |")
        curve = calibration["verify_curve"]
        draft_costs = calibration["draft_costs"]
        verify_ms = ", ".join(f"{s}: {1000 * t:.1f}" for s, t in zip(curve["sizes"], curve["seconds"]))
        draft_ms = ", ".join(
            f"{d}: {1000 * t:.1f}" for d, t in zip(draft_costs["depths"], draft_costs["propose_seconds"])
        )
        costs = (
            f"Verification forward cost (ms, measured in the decoding loop) by query tokens: {verify_ms}; plain "
            f"decoding {1000 * calibration['decode_seconds']:.1f} ms per token. Draft per cycle (ms, catch-up + "
            f"expansion) by depth: {draft_ms} (fitted {1000 * draft_costs['step_seconds']:.1f} ms per step)"
            + (f"; catch-up {1000 * draft_costs['extend_seconds']:.1f} ms." if draft_costs["extend_seconds"] else ".")
        )
        lines += ["", costs, ""]
    lines += ["## Conventions", ""]
    lines += [f"- `{key}`: {text}" for key, text in CONVENTIONS.items()]
    lines.append("")
    return "\n".join(lines)


def _divergence_summary(divergences: list[dict] | None) -> str:
    """`0`, or the count with the smallest margin at a first difference (`–` when not measured)."""
    if divergences is None:
        return "–"
    if not divergences:
        return "0"
    margins = [d["margin"] for d in divergences if d.get("margin") is not None]
    return f"{len(divergences)} (min margin {min(margins):.3g})" if margins else str(len(divergences))


def _fractions(fractions: dict[str, float] | None) -> str:
    if not fractions:
        return "–"
    return " / ".join(f"{fractions.get(key, 0.0):.2f}" for key in ("target_forward", "draft", "loop"))


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _divergence_list(divergences: list[dict]) -> str:
    shown = [
        f"prompt {d['prompt']} (row {d['row']}): token {d['first_diff']}, margin {_fmt(d.get('margin'), 3)}"
        + (f", float32 margin {_fmt(d.get('margin_float32'), 3)}" if "margin_float32" in d else "")
        for d in divergences[:12]
    ]
    more = f"; and {len(divergences) - 12} more" if len(divergences) > 12 else ""
    return "; ".join(shown) + more


def _exactness_section(records: list[dict], meta: dict) -> list[str]:
    """The "Exactness (T = 0)" section: the noise floor of plain decoding and every method's divergences."""
    audited = [r for r in records if r.get("divergences") is not None]
    floor = meta.get("noise_floor")
    if not audited and not floor:
        return []
    lines = ["## Exactness (T = 0)", ""]
    if floor and floor.get("prompts"):
        lines.append(
            f"Noise floor of plain decoding: plain {floor['dtype']} differs from plain {floor['reference']} (a "
            f"{floor['reference']} copy of the target, same weights) on {floor['diverging_prompts']} of "
            f"{floor['prompts']} prompts (rate {floor['rate']:.2f}, batch size {floor.get('batch_size')})"
            + (f": {_divergence_list(floor['divergences'])}." if floor.get("divergences") else ".")
        )
        lines.append("")
    elif meta.get("dtype") == "float32":
        lines += ["Noise floor: not measured (the bench runs in float32).", ""]
    if audited:
        lines += [
            "Rows not token-identical to plain generate (its logits give the margin: top-1 minus top-2 logit at the "
            "first differing token).",
            "",
            "| Method | Batch | Exact match | Diverging rows | Speedup on identical calls | Speedup by tokens/s "
            "| First differences (prompt: token, margin) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in audited:
            detail = _divergence_list(r["divergences"]) if r["divergences"] else "–"
            like = r.get("speedup_identical_calls")
            like = f"{like:.2f}× ({r.get('identical_calls')} of {r.get('calls')} calls)" if like else "–"
            by_rate = r.get("speedup_tokens_per_s")
            lines.append(f"| {record_label(r)} | {r['batch_size']} | {_fmt(r.get('exact_match'))} "
                         f"| {len(r['divergences'])} | {like} | {f'{by_rate:.2f}×' if by_rate else '–'} | {detail} |")
        lines.append("")
        lines += _common_identical_lines(audited)
    return lines


def common_identical_speedups(records: list[dict]) -> dict[int, tuple[int, int, dict[str, float]]]:
    """
    Per batch size, the like-for-like comparison of temperature-0 records whose outputs differ on some calls: over the
    calls that EVERY method reproduced exactly (`call_seconds`), each method's summed plain seconds / summed own
    seconds.

    Returns:
        `dict[int, tuple[int, int, dict[str, float]]]`: batch size -> (common calls, calls, speedup by record label);
        only batch sizes where some method diverged on some call.
    """
    out = {}
    for batch in sorted({r["batch_size"] for r in records}):
        group = [r for r in records
                 if r["batch_size"] == batch and r.get("temperature") == 0.0 and r.get("call_seconds")]
        if not group or all(all(call[4] for call in r["call_seconds"]) for r in group):
            continue
        keys = [{(call[0], call[1]) for call in r["call_seconds"] if call[4]} for r in group]
        common = set.intersection(*keys)
        every = set.union(*[{(call[0], call[1]) for call in r["call_seconds"]} for r in group])
        speedups = {}
        for r in group:
            mine = [call for call in r["call_seconds"] if (call[0], call[1]) in common]
            own = sum(call[2] for call in mine)
            if own > 0:
                speedups[record_label(r)] = sum(call[3] for call in mine) / own
        out[batch] = (len(common), len(every), speedups)
    return out


def _common_identical_lines(records: list[dict]) -> list[str]:
    lines = []
    for batch, (common, total, speedups) in common_identical_speedups(records).items():
        if not common:
            lines += [f"Batch size {batch}: no call was reproduced exactly by every method.", ""]
            continue
        listed = ", ".join(f"{label} {value:.2f}×" for label, value in speedups.items())
        lines += [f"Like for like, batch size {batch}: on the {common} of {total} calls that every method reproduced "
                  f"exactly, speedup over plain generate: {listed}.", ""]
    return lines


def _oracle_table(records: list[dict]) -> list[str]:
    """The "Oracle (perfect draft)" section: per depth, acceptance, speedups, the measured bound and its fraction."""
    oracle = [r for r in records if r["method"] == "oracle" and r.get("available")]
    if not oracle:
        return []
    lines = [
        "## Oracle (perfect draft)",
        "",
        "Plain generate's own greedy output replayed through the tree loop (a chain of `depth` tokens plus one decoy "
        "per depth). Bound = accept len × t_token / t_verify (decode only), measured in the same run; fraction = "
        "speedup / bound (decode speedup / bound). End-to-end bound = plain time / (time to first token + the "
        "oracle's verification time), the same ceiling with the prefill counted; its fraction = speedup / it.",
        "",
        "| Depth | Batch | Accept len | Speedup | Decode speedup | t_token ms | t_verify ms | Bound | Fraction of "
        "bound (decode) | End-to-end bound | Fraction of it | Time target / draft / loop | Exact verif. |",
        "|---" * 13 + "|",
    ]
    for r in oracle:
        t_token, t_verify = r.get("t_token_seconds"), r.get("t_verify_seconds")
        lines.append(
            f"| {r['oracle_depth']} | {r['batch_size']} | {_fmt(r.get('mean_accept_len'))} "
            f"| {_fmt(r.get('speedup'), suffix='×')} | {_fmt(r.get('decode_speedup'), suffix='×')} "
            f"| {_fmt(t_token * 1000 if t_token else None, 1)} | {_fmt(t_verify * 1000 if t_verify else None, 1)} "
            f"| {_fmt(r.get('bound'), suffix='×')} | {_fmt(r.get('fraction_of_bound'))} "
            f"({_fmt(r.get('decode_fraction_of_bound'))}) | {_fmt(r.get('end_to_end_bound'), suffix='×')} "
            f"| {_fmt(r.get('fraction_of_end_to_end_bound'))} | {_fractions(r.get('time_fractions'))} "
            f"| {_yes_no(r.get('exact_verification'))} |"
        )
    lines.append("")
    return lines


def _choices(histogram: dict[str, int] | None) -> str:
    if not histogram:
        return "–"
    return ", ".join(f"{name} {count}" for name, count in histogram.items())


def _ablation_table(records: list[dict]) -> list[str]:
    """The "Ablation: elastic compressor" section: one row per compressor variant (and `specvlm_tree` as reference)
    per batch size and temperature; empty when no `specvlm_tree_compressor` variant ran."""
    variants = [r for r in records if r["method"] == "specvlm_tree_compressor" and r.get("variant") is not None]
    if not variants:
        return []
    intro = (
        "Every variant runs with the tree knobs of `specvlm_tree` (its row is the reference), so only the compressor "
        "differs. Draft prefill columns are means per prompt."
    )
    header = (
        "| Variant | Batch | T | Accept len (incl. bonus) | Speedup | Exact match | Draft prefill ms | Draft prefill "
        "tokens | Draft prefill GFLOPs | Draft KV MiB | Compressor choices | Note |"
    )
    lines = ["## Ablation: elastic compressor", "", intro, "", header, "|---" * 12 + "|"]
    cells = sorted({(r["batch_size"], r["temperature"]) for r in variants})
    for batch_size, temperature in cells:
        cell = [r for r in records if r["batch_size"] == batch_size and r["temperature"] == temperature]
        rows = [r for r in cell if r["method"] == "specvlm_tree"] + [r for r in variants if r in cell]
        for r in rows:
            name = "specvlm_tree (reference)" if r["method"] == "specvlm_tree" else f"`{r['variant']}`"
            note = (r.get("note") or "").replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {name} | {batch_size} | {temperature:g} | {_fmt(r.get('mean_accept_len'))} "
                f"| {_fmt(r.get('speedup'), suffix='×')} | {_fmt(r.get('exact_match'))} "
                f"| {_fmt(r.get('draft_prefill_ms'), 2)} | {_fmt(r.get('draft_prefill_tokens'), 1)} "
                f"| {_fmt(r.get('draft_prefill_gflops'), 4)} | {_fmt(r.get('draft_kv_mib'), 3)} "
                f"| {_choices(r.get('compressor_choices'))} | {note} |"
            )
    lines.append("")
    return lines


def plot_results(records: list[dict], meta: dict, path: str | Path) -> Path | None:
    """
    Draws `results.png` (Agg backend): on a full-width top row, speedup bars per method (compressor variants labelled
    `compressor:NAME`), temperature and batch size; below, the acceptance per depth of the SpecVLM methods (first
    batch size) and, when calibrated, the verification cost curve and the modelled speedup by budget.

    Returns:
        the path, or `None` when matplotlib is not installed (`pip install specvlm-hf[bench]`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    calibration = meta.get("calibration")
    batch_sizes = sorted({r["batch_size"] for r in records})
    temperatures = sorted({r["temperature"] for r in records})
    labels = list(dict.fromkeys(record_label(r) for r in records))
    groups = [(b, t) for b in batch_sizes for t in temperatures]
    # the speedup bars get the whole top row, wide enough for every method (compressor variants included)
    n_bottom = 2 if calibration else 1
    width_in = min(max(6.0 * n_bottom, 12.0, 1.5 + len(labels) * (0.25 + 0.2 * len(groups))), 32.0)
    fig = plt.figure(figsize=(width_in, 9.5))
    grid = fig.add_gridspec(2, n_bottom, height_ratios=[1.1, 1.0])
    axes = [fig.add_subplot(grid[0, :]), *(fig.add_subplot(grid[1, i]) for i in range(n_bottom))]

    ax = axes[0]
    width = 0.8 / max(len(groups), 1)
    annotate = len(labels) * len(groups) <= 64
    for i, (batch_size, temperature) in enumerate(groups):
        values = []
        for label in labels:
            match = [r for r in records if record_label(r) == label and r["batch_size"] == batch_size
                     and r["temperature"] == temperature]
            values.append(match[0].get("speedup") or 0.0 if match else 0.0)
        xs = [m + (i - (len(groups) - 1) / 2) * width for m in range(len(labels))]
        bars = ax.bar(xs, values, width, label=f"T={temperature:g}, batch {batch_size}")
        if annotate:
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=6, padding=1)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("end-to-end speedup vs generate")
    ax.set_title("Speedup (0 = not run)")
    ax.legend(fontsize=7)

    ax = axes[1]
    colors = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    styles = ["-", "--", ":", "-."]
    for r in records:
        per_depth = r.get("acceptance_per_depth")
        if per_depth and r["batch_size"] == batch_sizes[0]:
            label = record_label(r)  # one colour per method, one line style per temperature
            ax.plot(range(1, len(per_depth) + 1), per_depth, marker="o", color=colors(labels.index(label) % 20),
                    ls=styles[temperatures.index(r["temperature"]) % len(styles)],
                    label=f"{label} T={r['temperature']:g}")
    ax.set_xlabel("draft depth")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("fraction of cycles reaching depth")
    ax.set_ylim(0, 1)
    ax.set_title(f"Acceptance per depth (batch {batch_sizes[0]})")
    if ax.lines:
        ax.legend(fontsize=6 if len(ax.lines) > 8 else 7, ncol=2 if len(ax.lines) > 8 else 1)

    if calibration:
        ax = axes[2]
        curve = calibration["verify_curve"]
        ax.plot(curve["sizes"], [1000 * s for s in curve["seconds"]], marker=".", color="C0",
                label="target forward (ms)")
        ax.set_xlabel("query tokens per target forward / tree_total_tokens")
        ax.set_ylabel("ms", color="C0")
        twin = ax.twinx()
        chosen = calibration["chosen"]
        for depth, row in calibration["choice"]["grid"].items():
            if int(depth) == chosen["tree_depth"] or int(depth) == calibration["pilot_depth"]:
                xs = [n for n, v in enumerate(row, start=1) if v is not None]
                twin.plot(xs, [row[n - 1] for n in xs], ls="--", label=f"modelled speedup, depth {depth}")
        twin.scatter([chosen["tree_total_tokens"]], [calibration["choice"]["predicted_speedup"]], color="red",
                     zorder=5, label=f"chosen: depth {chosen['tree_depth']}, {chosen['tree_total_tokens']} nodes")
        twin.set_ylabel("modelled speedup")
        handles = ax.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        twin.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7, loc="lower right")
        ax.set_title("Tree calibration")
    fig.suptitle(f"{meta.get('target')} · {meta.get('device')} {meta.get('dtype')} · {meta.get('date')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """
    Writes `value` as JSON (NaN/inf as `null`) to `path` atomically: into a temporary file of the same folder, flushed
    to disk, then moved over `path` with `os.replace`. A reader (or a run interrupted while writing) sees either the
    previous content or the new one, never a partial file.

    Returns:
        `Path`: `path`.
    """
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed below, before the replace)
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(json.dumps(_clean(value), indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def _has_records(path: Path) -> bool:
    """Whether `path` exists with anything but an empty JSON list (or whitespace) in it."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        return False
    try:
        return json.loads(text) != []
    except ValueError:
        return True  # something else is there: never overwritten silently


def prepare_output_dir(out_dir: str | Path, resume: bool = False) -> Path:
    """
    Checks the output folder before anything is measured: creates it if needed, checks that files can be written in
    it, and refuses to overwrite earlier results.

    Args:
        out_dir (`str` or `Path`): the folder (`--out`).
        resume (`bool`, *optional*, defaults to `False`): whether existing results may be kept and completed
            (`--resume`); without it, a `results.json` holding records is refused.

    Returns:
        `Path`: the folder.

    Raises:
        [`~specvlm_hf.errors.UserValueError`]: the path is a file, cannot be created or is not writable, or holds
            results and `resume` is off (the message says to pass `--resume` or another `--out`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserValueError(f"--out {out_dir} is a file, not a folder; choose a folder for the results")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserValueError(f"--out {out_dir}: cannot create the folder ({error.strerror or error})") from None
    try:  # the only reliable test (permissions, read-only mounts, quotas): write a file
        descriptor, probe = tempfile.mkstemp(dir=out_dir, prefix=".specvlm-bench-write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise UserValueError(f"--out {out_dir} is not writable ({error.strerror or error})") from None
    results = out_dir / RESULTS_FILE
    if results.exists() and not results.is_file():
        raise UserValueError(f"{results} is not a file; choose another --out")
    if not resume and _has_records(results):
        raise UserValueError(
            f"{results} already holds results; pass --resume to keep them and run only the missing records, or "
            "choose another --out"
        )
    return out_dir


def read_previous_run(out_dir: str | Path) -> tuple[list[dict], dict | None]:
    """
    The records of `<out_dir>/results.json` and the metadata of `<out_dir>/meta.json` left by an earlier (possibly
    interrupted) run, for `--resume`.

    Returns:
        `tuple`: the records (`[]` when there is no `results.json`) and the metadata (`None` without a readable
        `meta.json`).

    Raises:
        [`~specvlm_hf.errors.UserValueError`]: `results.json` is not a JSON list of records.
    """
    from .runner import RECORD_KEY_FIELDS

    out_dir = Path(out_dir)
    results = out_dir / RESULTS_FILE
    records: list[dict] = []
    if _has_records(results):
        try:
            records = json.loads(results.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserValueError(
                f"{results} is not valid JSON ({error}); it was not written by specvlm bench: choose another --out"
            ) from None
        required = [key for key in RECORD_KEY_FIELDS if key not in ("variant", "oracle_depth")]  # optional fields
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(key in r for key in required) for r in records
        ):
            raise UserValueError(
                f"{results} is not a list of specvlm bench records (each with {required}); choose another --out"
            )
    meta = None
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return records, meta if isinstance(meta, dict) else None


def write_records(out_dir: str | Path, records: list[dict], meta: dict | None = None) -> dict[str, Path]:
    """
    Writes `results.json` and, when given, `meta.json`, each atomically ([`write_json_atomic`]); the cheap part of
    [`write_results`], called after every finished group of records.

    Returns:
        `dict[str, Path]`: what was written (`json`, and `meta` when given).
    """
    out_dir = Path(out_dir)
    written = {"json": write_json_atomic(out_dir / RESULTS_FILE, records)}
    if meta is not None:
        written["meta"] = write_json_atomic(out_dir / META_FILE, meta)
    return written


def write_results(out_dir: str | Path, records: list[dict], meta: dict) -> dict[str, Path]:
    """
    Writes `results.json` (the list of records), `meta.json`, `results.md` and `results.png` into `out_dir` (the two
    JSON files atomically).

    Returns:
        `dict[str, Path]`: what was written (`png` is absent without matplotlib, or when there is no record).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, meta = _clean(records), _clean(meta)
    written = write_records(out_dir, records, meta)
    written["md"] = out_dir / "results.md"
    written["md"].write_text(render_markdown(records, meta))
    png = plot_results(records, meta, out_dir / "results.png") if records else None
    if png is not None:
        written["png"] = png
    return written
