"""`specvlm bench`: end-to-end speed and acceptance of SpecVLM drafts against plain `generate`, transformers prompt
lookup and assisted generation, with tree-budget calibration.

Pieces: [`load_prompts`] / [`render_batch`] (the JSONL prompt format), [`build_methods`] (what runs),
[`calibrate`] / [`choose_tree_budget`] (tree budget from measured costs and a pilot), [`run_benchmark`] (interleaved
timed calls and aggregation, group by group, skipping the [`record_key`]s already measured), the exactness audit
([`PlainReference`], [`find_divergences`], [`measure_noise_floor`] in `specvlm_hf.bench.exactness`), [`write_results`]
(`results.json`, `meta.json`, `results.md`, `results.png`), the acceptance ceiling under sampling
([`sampling_ceiling`] in `specvlm_hf.bench.ceiling`), and the command line in `specvlm_hf.bench.cli`
(`specvlm bench --help`).
"""

from __future__ import annotations

from .calibration import (
    CalibrationResult,
    CostCurve,
    TreeChoice,
    calibrate,
    choose_tree_budget,
    predict_speedup,
)
from .ceiling import SamplingCeiling, sampling_ceiling
from .exactness import PlainReference, find_divergences, measure_noise_floor
from .methods import METHODS, Method, TreeSettings, build_methods
from .prompts import BenchPrompt, load_prompts, render_batch
from .report import write_results
from .runner import BenchOutcome, BenchSettings, interleaved_schedule, record_key, run_benchmark

__all__ = [
    "METHODS",
    "BenchOutcome",
    "BenchPrompt",
    "BenchSettings",
    "CalibrationResult",
    "CostCurve",
    "Method",
    "PlainReference",
    "SamplingCeiling",
    "TreeChoice",
    "TreeSettings",
    "build_methods",
    "calibrate",
    "choose_tree_budget",
    "find_divergences",
    "interleaved_schedule",
    "load_prompts",
    "measure_noise_floor",
    "predict_speedup",
    "record_key",
    "render_batch",
    "run_benchmark",
    "sampling_ceiling",
    "write_results",
]
