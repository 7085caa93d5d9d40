"""`specvlm bench`: speed and acceptance of SpecVLM drafts against plain `generate`, prompt lookup and assisted
generation, written as `results.json` / `meta.json` / `results.md` / `results.png`.

```bash
specvlm bench --out bench-results                       # pocket VLM + its shipped draft, default prompts, T = 0 and 1
specvlm bench --target llava-hf/llava-1.5-7b-hf --draft my-org/llava-draft --device cuda --batch-size 1 2 4
specvlm bench --methods generate specvlm_tree --temperature 0 --repeats 1 --cap-new-tokens 32 --out smoke
specvlm bench --methods specvlm_tree specvlm_tree_compressor --compressor-draft none=abl/none abl/pool abl/select
```

Without `--target`/`--draft` it benchmarks the pocket VLM (`specvlm_hf.pocket.load_pocket_vlm`) with its shipped
trained draft (`load_pocket_draft`) and, for `assisted`, the truncated-layer SmolLM2 of
`specvlm_hf.pocket.assistant` (first `POCKET_ASSISTANT_LAYERS` layers of the VLM's own language model). The prompts
default to the committed held-out benchmark prompts (`specvlm_hf/assets/bench/prompts.jsonl`).

The elastic-compressor ablation: `--compressor-draft` takes one or more `PATH` or `NAME=PATH` values (the name
defaults to the folder name); each draft becomes a `specvlm_tree_compressor` record with `variant` = NAME (labelled
`compressor:NAME`), interleaved with the other methods and run with the tree knobs of `specvlm_tree` (calibrated, or the
main draft's config; without a main draft, the first variant's), so that only the compressor differs. A variant
without a compressor is the ablation's control (name it `none`). `results.md` then gets an "Ablation: elastic
compressor" table (acceptance, speedup and the draft's prefill time, tokens, GFLOPs and KV cache per prompt).

What is measured and how (interleaved repetitions, time to first token, peak memory) is described in
`specvlm_hf.bench.runner`; the tree calibration (cost curve + pilot on the first prompts at temperature 0, argmax of
a modelled speedup) in `specvlm_hf.bench.calibration`. On a CPU shared with other jobs pass `--num-threads` below the
number of free cores: oversubscribed threads make every forward several times slower and the timings meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TRUNCATED_PREFIX = "truncated:"


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Builds (or fills) the `specvlm bench` argument parser."""
    from .calibration import DEFAULT_PILOT_BUDGETS
    from .methods import METHODS

    examples = __doc__.split("```bash\n", 1)[1].split("```", 1)[0]
    parser = parser or argparse.ArgumentParser(
        prog="specvlm bench",
        description="Speed and acceptance of SpecVLM drafts against plain generate, prompt lookup and assisted "
        "generation; writes results.json, meta.json, results.md and results.png.",
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument("--target", default=None, help="target path or Hub id (default: the pocket VLM)")
    models.add_argument("--draft", default=None, help="SpecVLM draft path or Hub id (default with the pocket VLM: "
                        "its shipped trained draft)")
    models.add_argument("--compressor-draft", nargs="+", default=None, metavar="[NAME=]PATH",
                        help="compressor variants for specvlm_tree_compressor (the elastic-compressor ablation): "
                        "SpecVLM drafts as PATH or NAME=PATH (NAME defaults to the folder name), one record each; a "
                        "draft without a compressor is the ablation's control (name it `none`)")
    models.add_argument("--assistant", default=None,
                        help="assistant for `assisted`: a path / Hub id of a same-tokenizer causal LM, or "
                        f"'{TRUNCATED_PREFIX}K' for the target's first K layers (default with the pocket VLM: "
                        f"{TRUNCATED_PREFIX}<POCKET_ASSISTANT_LAYERS>)")
    models.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    models.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="model dtype (default: bfloat16)")
    models.add_argument("--attn-implementation", default=None,
                        help="attention of a --target (SpecVLM drafts need sdpa or eager; default: transformers' "
                        "choice, sdpa where the model supports it)")

    run = parser.add_argument_group("what to run")
    run.add_argument("--prompts", type=Path, default=None,
                     help="JSONL prompts file (default: the committed benchmark prompts)")
    run.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    run.add_argument("--max-new-tokens", type=int, default=128,
                     help="max_new_tokens of prompts that do not set it (default: 128)")
    run.add_argument("--cap-new-tokens", type=int, default=None, help="upper bound on every prompt's max_new_tokens")
    run.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                     help=f"subset of {', '.join(METHODS)} (generate always runs: it is the baseline)")
    run.add_argument("--temperature", nargs="+", type=float, default=[0.0, 1.0], help="temperatures (default: 0 1)")
    run.add_argument("--batch-size", nargs="+", type=int, default=[1], help="batch sizes to sweep (default: 1)")
    run.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default: 2)")
    run.add_argument("--top-k", type=int, default=0, help="top_k when sampling (default: 0 = off)")
    run.add_argument("--top-p", type=float, default=1.0, help="top_p when sampling (default: 1.0 = off)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--chain-depth", type=int, default=None,
                     help="chain length of specvlm_chain (default: the draft config's tree_depth)")
    run.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    run.add_argument("--num-assistant-tokens", type=int, default=None,
                     help="assistant tokens per step of `assisted` (default: transformers' 20 with its adaptive "
                     "confidence threshold)")
    run.add_argument("--num-threads", type=int, default=None,
                     help="torch CPU threads (default: torch's); on a CPU shared with other jobs use fewer threads "
                     "than free cores: oversubscribed threads slow every forward down many times")
    run.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: bench-results)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    cal = parser.add_argument_group("tree calibration (for specvlm_tree)")
    cal.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                     help="choose tree_depth / tree_total_tokens from measured costs and a pilot (default: on); "
                     "--no-calibrate uses the draft config's knobs")
    cal.add_argument("--pilot-prompts", type=int, default=2, help="prompts of the pilot (default: 2, the first ones)")
    cal.add_argument("--pilot-max-new-tokens", type=int, default=64)
    cal.add_argument("--pilot-budgets", nargs="+", type=int, default=list(DEFAULT_PILOT_BUDGETS),
                     help="tree_total_tokens values run in the pilot")
    cal.add_argument("--max-tree-nodes", type=int, default=64, help="largest tree_total_tokens considered")
    cal.add_argument("--calibration-repeats", type=int, default=5, help="timings per cost point (median)")
    return parser


def _register_optional_towers() -> None:
    try:  # the pocket VLM's vision tower must be registered to load a saved pocket VLM by path
        import specvlm_hf.pocket  # noqa: F401
    except ImportError:
        pass


def load_target(name: str, dtype: torch.dtype, device: str, attn_implementation: str | None = None):
    """
    Loads a target with `AutoModelForImageTextToText` + `AutoProcessor`, falling back to `AutoModelForCausalLM` +
    `AutoTokenizer` for text-only models.

    Returns:
        `tuple`: the model (eval mode, on `device`) and its processor or tokenizer.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    _register_optional_towers()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        processor = AutoTokenizer.from_pretrained(name)
    return model.to(device).eval(), processor


def load_draft(name: str, target: Any, dtype: torch.dtype, device: str):
    """
    Loads a SpecVLM draft with `AutoModel.from_pretrained` and checks it against `target` (the library's
    compatibility error says what differs). With or without an elastic compressor: a compressor-less
    `--compressor-draft` is the ablation's control.
    """
    from transformers import AutoModel

    from .. import is_specvlm_draft

    draft = AutoModel.from_pretrained(name, dtype=dtype)
    if not is_specvlm_draft(draft):
        raise ValueError(f"{name} is a {type(draft).__name__}, not a SpecVLM draft (model_type 'specvlm_draft')")
    draft.check_compatible(target)
    return draft.to(device).eval()


def load_assistant(spec: str, target: Any, dtype: torch.dtype, device: str) -> tuple[Any, str]:
    """The `assisted` method's assistant from `--assistant` (`truncated:K` or a path / Hub id), with a description."""
    if spec.startswith(TRUNCATED_PREFIX):
        from ..pocket.assistant import build_truncated_assistant

        value = spec[len(TRUNCATED_PREFIX):]
        if not value.isdigit():
            raise ValueError(f"--assistant {spec!r}: expected {TRUNCATED_PREFIX}K with an integer K")
        layers = int(value)
        total = target.config.get_text_config().num_hidden_layers
        return (build_truncated_assistant(target, layers),
                f"first {layers} of {total} layers of the target's language model (untrained early exit)")
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
    return assistant, spec


def _load_pocket(dtype: torch.dtype, device: str, want_draft: bool):
    from ..pocket import load_pocket_vlm

    target, processor = load_pocket_vlm(dtype=dtype)
    target = target.to(device).eval()
    draft = None
    if want_draft:
        try:
            from ..pocket import load_pocket_draft
        except ImportError as error:
            raise RuntimeError(
                "the pocket VLM's trained draft is not available in this installation "
                f"(specvlm_hf.pocket.load_pocket_draft: {error}); pass --draft PATH"
            ) from error
        draft = load_pocket_draft(target).to(device).eval()
    return target, processor, draft


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import specvlm_hf  # noqa: F401  (registers the draft and routes generate)

    from .calibration import calibrate
    from .methods import (
        TreeSettings,
        build_methods,
        check_method_names,
        compressor_summary,
        parse_variant_specs,
    )
    from .prompts import load_prompts, render_batch
    from .report import (
        CONVENTIONS,
        hardware_info,
        software_versions,
        utc_now,
        write_results,
    )
    from .runner import BenchSettings, run_benchmark

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    names = check_method_names(args.methods)
    variant_specs = parse_variant_specs(args.compressor_draft or [])
    if "specvlm_tree_compressor" not in names:
        variant_specs = []
    settings = BenchSettings(
        temperatures=args.temperature, batch_sizes=args.batch_size, repeats=args.repeats, seed=args.seed,
        top_k=args.top_k, top_p=args.top_p, cap_new_tokens=args.cap_new_tokens,
    )
    if args.prompts is not None:
        prompts_file = args.prompts
    else:
        from ..pocket.data import BENCH_DIR, BENCH_PROMPTS_FILE

        prompts_file = BENCH_DIR / BENCH_PROMPTS_FILE
    prompts = load_prompts(prompts_file, default_max_new_tokens=args.max_new_tokens)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]

    dtype = DTYPES[args.dtype]
    wants_draft = any(name in ("specvlm_chain", "specvlm_tree") for name in names)
    # the compressor variants take the main draft's tree knobs (calibrated or its config) when there is one
    knobs_draft = bool(variant_specs) and (args.draft is not None or args.target is None)
    started = time.perf_counter()
    assistant = assistant_note = None
    if args.target is None:
        target, processor, draft = _load_pocket(dtype, args.device, (wants_draft or knobs_draft) and args.draft is None)
        target_name = "pocket VLM (specvlm_hf.pocket: SmolLM2-135M-Instruct + EfficientNet-Lite0, LLaVA)"
        draft_name = args.draft or ("pocket draft (specvlm_hf.pocket.load_pocket_draft)" if draft is not None else None)
        if args.assistant is None and "assisted" in names:
            from ..pocket.assistant import POCKET_ASSISTANT_LAYERS

            args.assistant = f"{TRUNCATED_PREFIX}{POCKET_ASSISTANT_LAYERS}"
    else:
        if wants_draft and args.draft is None:
            raise ValueError("--draft is required with --target for the specvlm_* methods "
                             "(or choose --methods without specvlm_chain / specvlm_tree)")
        target, processor = load_target(args.target, dtype, args.device, args.attn_implementation)
        target_name, draft_name, draft = args.target, args.draft, None
    if args.draft is not None and (wants_draft or knobs_draft):
        draft = load_draft(args.draft, target, dtype, args.device)
    compressor_drafts = {name: load_draft(path, target, dtype, args.device) for name, path in variant_specs}
    if compressor_drafts and all(compressor_summary(d) is None for d in compressor_drafts.values()):
        print("[specvlm bench] warning: no --compressor-draft has an elastic compressor; the specvlm_tree_compressor "
              "records only measure compressor-less drafts", file=sys.stderr)
    if args.assistant is not None and "assisted" in names:
        assistant, assistant_note = load_assistant(args.assistant, target, dtype, args.device)
    load_seconds = time.perf_counter() - started

    calibration = None
    tree = None
    # the draft whose knobs (calibrated or from its config) every tree method uses: the main draft, else the first
    # compressor variant
    knob_source = draft if draft is not None else next(iter(compressor_drafts.values()), None)
    if knob_source is not None:
        tree = TreeSettings(knob_source.config.tree_top_k, knob_source.config.tree_depth,
                            knob_source.config.tree_total_tokens)
    tree_methods = [name for name in names if name in ("specvlm_tree", "specvlm_tree_compressor")]
    if args.calibrate and knob_source is not None and tree_methods:
        device = target.get_output_embeddings().weight.device
        pilot = [render_batch(processor, [p], device, target.dtype) for p in prompts[: max(args.pilot_prompts, 1)]]
        calibration = calibrate(
            target, knob_source, pilot, budgets=args.pilot_budgets, max_nodes=args.max_tree_nodes,
            pilot_max_new_tokens=args.pilot_max_new_tokens, repeats=args.calibration_repeats,
            progress=None if args.no_progress else (lambda message: print(f"[specvlm bench] {message}",
                                                                         file=sys.stderr)),
        )
        tree = TreeSettings(calibration.top_k, calibration.choice.depth, calibration.choice.total_tokens)

    methods = build_methods(
        names, draft=draft, compressor_drafts=compressor_drafts, assistant=assistant, assistant_note=assistant_note,
        tree=tree, chain_depth=args.chain_depth, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        num_assistant_tokens=args.num_assistant_tokens,
    )
    records, runs, _ = run_benchmark(target, processor, prompts, methods, settings, progress=not args.no_progress)
    if calibration is not None:
        for record in records:
            if record["method"] in ("specvlm_tree", "specvlm_tree_compressor"):
                record["calibrated"] = True

    meta = {
        "date": utc_now(),
        "hardware": hardware_info(args.device),
        "versions": software_versions(),
        "device": args.device,
        "dtype": args.dtype,
        "target": target_name,
        "draft": draft_name,
        "draft_config_tree": None if draft is None else {
            "tree_top_k": draft.config.tree_top_k, "tree_depth": draft.config.tree_depth,
            "tree_total_tokens": draft.config.tree_total_tokens,
        },
        "compressor_drafts": {
            name: {"path": path, "compressor": compressor_summary(compressor_drafts[name])}
            for name, path in variant_specs
        },
        "assistant": assistant_note,
        "prompts_file": str(prompts_file),
        "num_prompts": len(prompts),
        "repeats": args.repeats,
        "temperatures": settings.temperatures,
        "batch_sizes": settings.batch_sizes,
        "methods": [m.name for m in methods],
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "max_new_tokens_default": args.max_new_tokens,
        "cap_new_tokens": args.cap_new_tokens,
        "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
        "load_seconds": load_seconds,
        "timed_calls": len(runs),
        "ttft_method": "plain generate with max_new_tokens=1 per batch of prompts and repetition (median)",
        "calibration": calibration.to_dict() if calibration is not None else None,
        "tree_knobs_used": None if tree is None else {
            "tree_top_k": tree.top_k, "tree_depth": tree.depth, "tree_total_tokens": tree.total_tokens,
            "source": "calibrated" if calibration is not None else "draft config",
            "draft": "main draft" if knob_source is draft else f"compressor variant {next(iter(compressor_drafts))}",
        },
    }
    meta["conventions"] = CONVENTIONS
    written = write_results(args.out, records, meta)
    print(f"[specvlm bench] wrote {', '.join(str(p) for p in written.values())}")
    for record in records:
        print("  " + _summary_line(record))
    return 0


def _summary_line(record: dict) -> str:
    from .methods import record_label

    def show(value: Any, suffix: str = "") -> str:
        return "–" if value is None else f"{value:.2f}{suffix}"

    line = (
        f"batch {record['batch_size']} {record_label(record):<24} T={record['temperature']:<4g} "
        f"speedup {show(record.get('speedup'), 'x'):>6}  accept {show(record.get('mean_accept_len')):>5}  "
        f"exact {show(record.get('exact_match'))}"
    )
    if record.get("note") and not record.get("available"):
        line += f"  ({record['note']})"
    return line


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
