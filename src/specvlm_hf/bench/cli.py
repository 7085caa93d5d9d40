"""`specvlm bench`: speed and acceptance of SpecVLM drafts against plain `generate`, prompt lookup and assisted
generation, written as `results.json` / `meta.json` / `results.md` / `results.png`.

```bash
specvlm bench --out bench-results                       # pocket VLM + its shipped draft, default prompts, T = 0 and 1
specvlm bench --target llava-hf/llava-1.5-7b-hf --draft my-org/llava-draft --device cuda --batch-size 1 2 4
specvlm bench --methods generate specvlm_tree --temperature 0 --repeats 1 --cap-new-tokens 32 --out smoke
specvlm bench --methods specvlm_tree specvlm_tree_compressor --compressor-draft none=abl/none abl/pool abl/select
specvlm bench --methods generate oracle specvlm_tree --temperature 0 --oracle-depths 2 4 8   # perfect-draft bound
specvlm bench --out bench-results --resume              # after Ctrl-C: keep the finished records, run the rest
```

Flags follow the convention of every `specvlm` sub-command: `--kebab-case`, with the `--snake_case` spelling accepted
as an alias (`--cap_new_tokens 32`); `specvlm train` (transformers' `HfArgumentParser`) accepts both spellings of its
flags too, and `specvlm pocket` flags are kebab-case.

Every flag, the prompts file and `--out` are checked before any model loads; a mistake is reported as one line
(`specvlm bench: error: ...`, exit status 2). `results.json` is rewritten atomically after every finished group of
records (one batch size at one temperature) and `meta.json` is written first, so an interrupted run (Ctrl-C) leaves
valid partial results, and `results.md` / `results.png` of what finished. An existing `results.json` is never
overwritten: `--resume` keeps its records (identified by method, compressor variant, oracle depth, temperature and
batch size, `specvlm_hf.bench.runner.record_key`) and runs only the missing ones, provided that the flags that change
what a record measures ([`RESUME_SETTINGS`]) are the same; the tree knobs of the earlier run are reused.

Without `--target`/`--draft` it benchmarks the pocket VLM (`specvlm_hf.pocket.load_pocket_vlm`) with its shipped
trained draft (`load_pocket_draft`) and, for `assisted`, the truncated-layer assistant of
`specvlm_hf.bench.assistant` (`--assistant truncated:K`, here K = `specvlm_hf.pocket.assistant.POCKET_ASSISTANT_LAYERS`
layers of the VLM's own language model). The prompts default to the committed held-out benchmark prompts
(`specvlm_hf.bench.prompts.DEFAULT_PROMPTS_PATH`, `specvlm_hf/assets/bench/prompts.jsonl`); nothing but the pocket VLM
itself needs `specvlm_hf.pocket`.

The elastic-compressor ablation: `--compressor-draft` takes one or more `PATH` or `NAME=PATH` values (the name
defaults to the folder name); each draft becomes a `specvlm_tree_compressor` record with `variant` = NAME (labelled
`compressor:NAME`), interleaved with the other methods and run with the tree knobs of `specvlm_tree` (calibrated, or the
main draft's config; without a main draft, the first variant's), so that only the compressor differs. A variant
without a compressor is the ablation's control (name it `none`). `results.md` then gets an "Ablation: elastic
compressor" table (acceptance, speedup and the draft's prefill time, tokens, GFLOPs and KV cache per prompt).

Dtype: `--dtype auto` (the default) runs bfloat16 where the device has native bf16 matrix units (CPU: AVX512-BF16 or
AMX; CUDA: bf16 support) and the exact-verification probe passes, float32 otherwise
(`specvlm_hf.demo.choose_dtype`); the choice and its reason are printed and recorded in `meta.json` (`dtype`,
`dtype_reason`). `--draft-dtype auto` (the default) runs the SpecVLM drafts of a float32 target in bfloat16 where the
device has native bf16 matrix units (the target verifies every token, so the output is unchanged;
`specvlm_hf.demo.choose_draft_dtype`), recorded as `draft_dtype` / `draft_dtype_reason`.

Exactness audit (temperature 0): every record lists its `divergences` from plain `generate` (row, first differing
token, the target's top-2 logit margin there), and in bfloat16/float16 the noise floor of plain decoding itself
(against a float32 copy of the target, `meta.json["noise_floor"]`, `--no-noise-floor` skips it); see
`specvlm_hf.bench.exactness`. The `oracle` method replays plain `generate`'s own output through the tree loop (a
perfect draft) for each `--oracle-depths` value and reports the bound `mean_accept_len * t_token / t_verify` with
`fraction_of_bound`; see `specvlm_hf.bench.methods` and `specvlm_hf.bench.runner.oracle_bound`. Every SpecVLM record
carries `time_fractions` (target forwards / draft / the loop's own time) and `exact_verification`
(`--exact-verification auto|on|off` sets it for every SpecVLM method and for the calibration's calls). Where outputs
differ (reduced-precision near-ties), a diverged call can run longer or shorter than plain `generate`'s, so records
also carry `speedup_identical_calls` (the speedup over only the calls with identical output, a like-for-like ratio)
and `speedup_tokens_per_s`; `results.md` shows both in its exactness section.

What is measured and how (interleaved repetitions, time to first token, peak memory) is described in
`specvlm_hf.bench.runner`; the tree calibration (cost curve + pilot on the first prompts at temperature 0, argmax of
a modelled speedup) in `specvlm_hf.bench.calibration`. On a CPU shared with other jobs pass `--num-threads` below the
number of free cores: oversubscribed threads make every forward several times slower and the timings meaningless.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..demo import (
    DTYPE_NAMES,
    OneLineErrorParser,
    choose_draft_dtype,
    choose_dtype,
    non_negative_int,
    positive_int,
    require_pocket,
    target_linear_shapes,
)
from ..errors import UserError, UserFileNotFoundError, UserValueError

TREE_METHODS = ("specvlm_tree", "specvlm_tree_compressor")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
TRUNCATED_PREFIX = "truncated:"
#: The flags (as `meta.json["settings"]` keys) that must be the same for `--resume` to add records to earlier ones:
#: everything that changes what a record measures, but not which records exist (methods, temperatures, batch sizes).
RESUME_SETTINGS = (
    "target", "draft", "compressor_drafts", "assistant", "device", "dtype", "attn_implementation", "prompts_file",
    "num_prompts", "max_new_tokens", "cap_new_tokens", "repeats", "top_k", "top_p", "seed", "chain_depth",
    "prompt_lookup_num_tokens", "num_assistant_tokens", "num_threads", "calibrate", "exact_verification", "draft_dtype",
)


def _temperature(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a finite temperature >= 0 (0 = greedy), got {value!r}")
    return number


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {value!r}")
    return number


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available (torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: MPS is not available")
    return value


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Builds (or fills) the `specvlm bench` argument parser."""
    from .calibration import DEFAULT_PILOT_BUDGETS
    from .methods import DEFAULT_ORACLE_DEPTHS, METHODS

    examples = __doc__.split("```bash\n", 1)[1].split("```", 1)[0]
    parser = parser or OneLineErrorParser(
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
    models.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    models.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="model dtype (default: auto = bfloat16 where the device has native bf16 matrix units, "
                        "AVX512-BF16/AMX on CPUs, and the exact-verification probe passes; float32 otherwise)")
    models.add_argument("--draft-dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="dtype of the SpecVLM drafts (the target verifies every token, so it never changes the "
                        "output): auto = bfloat16 for a float32 target on a device with native bf16 matrix units, "
                        "the target's dtype otherwise (default: auto)")
    models.add_argument("--exact-verification", choices=["auto", "on", "off"], default="auto",
                        help="exact verification of the SpecVLM methods (generate(..., exact_verification=)): auto = "
                        "the loop's choice (on for bf16/fp16 CPUs where it makes greedy output bitwise plain "
                        "decoding's), on = the row-wise attention even where it cannot (fewer differences, slower), "
                        "off = the fast path (default: auto)")
    models.add_argument("--attn-implementation", default=None,
                        help="attention of a --target (SpecVLM drafts need sdpa or eager; default: transformers' "
                        "choice, sdpa where the model supports it)")

    run = parser.add_argument_group("what to run")
    run.add_argument("--prompts", type=Path, default=None,
                     help="JSONL prompts file (default: the committed benchmark prompts)")
    run.add_argument("--max-prompts", type=positive_int, default=None, help="use only the first N prompts")
    run.add_argument("--max-new-tokens", type=positive_int, default=128,
                     help="max_new_tokens of prompts that do not set it (default: 128)")
    run.add_argument("--cap-new-tokens", type=positive_int, default=None,
                     help="upper bound on every prompt's max_new_tokens")
    run.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD", choices=METHODS,
                     help=f"subset of {', '.join(METHODS)} (generate always runs: it is the baseline)")
    run.add_argument("--temperature", nargs="+", type=_temperature, default=[0.0, 1.0],
                     help="temperatures (default: 0 1)")
    run.add_argument("--batch-size", nargs="+", type=positive_int, default=[1],
                     help="batch sizes to sweep (default: 1)")
    run.add_argument("--repeats", type=positive_int, default=2, help="interleaved repetitions (default: 2)")
    run.add_argument("--top-k", type=non_negative_int, default=0, help="top_k when sampling (default: 0 = off)")
    run.add_argument("--top-p", type=_probability, default=1.0, help="top_p when sampling (default: 1.0 = off)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--chain-depth", type=positive_int, default=None,
                     help="chain length of specvlm_chain (default: the draft config's tree_depth)")
    run.add_argument("--prompt-lookup-num-tokens", type=positive_int, default=10)
    run.add_argument("--num-assistant-tokens", type=positive_int, default=None,
                     help="assistant tokens per step of `assisted` (default: transformers' 20 with its adaptive "
                     "confidence threshold)")
    run.add_argument("--oracle-depths", nargs="+", type=positive_int, default=list(DEFAULT_ORACLE_DEPTHS),
                     metavar="D", help="chain lengths of the `oracle` method, one record each (default: "
                     f"{' '.join(map(str, DEFAULT_ORACLE_DEPTHS))}; temperature 0 only)")
    run.add_argument("--noise-floor", action=argparse.BooleanOptionalAction, default=True,
                     help="in bfloat16/float16, measure how often plain decoding itself differs from float32 (a "
                     "float32 copy of the target, same prompts, T=0; default: on)")
    run.add_argument("--num-threads", type=positive_int, default=None,
                     help="torch CPU threads (default: torch's); on a CPU shared with other jobs use fewer threads "
                     "than free cores: oversubscribed threads slow every forward down many times")
    run.add_argument("--out", type=Path, default=Path("bench-results"),
                     help="output folder (default: bench-results); checked before any model loads; results.json is "
                     "rewritten after every finished group of records, so an interrupted run keeps them")
    run.add_argument("--resume", action="store_true",
                     help="keep the records of an earlier (interrupted) run in --out/results.json and run only the "
                     "missing ones (same settings required); without it, existing results are never overwritten")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    cal = parser.add_argument_group("tree calibration (for specvlm_tree)")
    cal.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                     help="choose tree_depth / tree_total_tokens from measured costs and a pilot (default: on); "
                     "--no-calibrate uses the draft config's knobs")
    cal.add_argument("--pilot-prompts", type=positive_int, default=2,
                     help="prompts of the pilot (default: 2, the first ones)")
    cal.add_argument("--pilot-max-new-tokens", type=positive_int, default=64)
    cal.add_argument("--pilot-budgets", nargs="+", type=positive_int, default=list(DEFAULT_PILOT_BUDGETS),
                     help="tree_total_tokens values run in the pilot")
    cal.add_argument("--max-tree-nodes", type=positive_int, default=64, help="largest tree_total_tokens considered")
    cal.add_argument("--calibration-repeats", type=positive_int, default=5, help="timings per cost point (median)")
    return parser


def _register_optional_towers() -> None:
    try:  # the pocket VLM's vision tower must be registered to load a saved pocket VLM by path
        import specvlm_hf.pocket  # noqa: F401
    except ImportError:
        pass


def check_model_name(flag: str, name: str) -> None:
    """
    Checks a model path / Hub id given on the command line before anything loads: an existing path must be a folder
    with a `config.json`; a name that can only be a local path (starts with `.`, `/` or `~`, or has more than one
    `/`) must exist. Other names are Hub ids, checked when they load.

    Raises:
        [`~specvlm_hf.errors.UserFileNotFoundError`] or [`~specvlm_hf.errors.UserValueError`], naming the flag.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserValueError(f"{flag} {name} is a file; expected a saved model folder or a Hub id")
        if not (path / "config.json").is_file():
            raise UserValueError(f"{flag} {name} has no config.json; expected a folder written by save_pretrained")
        return
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        raise UserFileNotFoundError(f"{flag} {name} does not exist")


def _from_pretrained(flag: str, name: str, load: Any, **kwargs: Any) -> Any:
    """`load(name, **kwargs)`, with transformers' `OSError` (no such model, no network, unreadable files) as a
    one-line user error naming the flag."""
    try:
        return load(name, **kwargs)
    except OSError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserValueError(f"{flag} {name}: cannot load it ({first_line})") from error


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
        model = _from_pretrained("--target", name, AutoModelForImageTextToText.from_pretrained, **kwargs)
        processor = _from_pretrained("--target", name, AutoProcessor.from_pretrained)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        model = _from_pretrained("--target", name, AutoModelForCausalLM.from_pretrained, **kwargs)
        processor = _from_pretrained("--target", name, AutoTokenizer.from_pretrained)
    return model.to(device).eval(), processor


def load_draft(name: str, target: Any, dtype: torch.dtype, device: str, flag: str = "--draft"):
    """
    Loads a SpecVLM draft with `AutoModel.from_pretrained` and checks it against `target` (the library's
    compatibility error says what differs). With or without an elastic compressor: a compressor-less
    `--compressor-draft` is the ablation's control.

    Raises:
        [`~specvlm_hf.errors.UserValueError`]: the model cannot be loaded, is not a SpecVLM draft, or does not fit
            `target`.
    """
    from transformers import AutoModel

    from .. import is_specvlm_draft

    draft = _from_pretrained(flag, name, AutoModel.from_pretrained, dtype=dtype)
    if not is_specvlm_draft(draft):
        raise UserValueError(f"{flag} {name} is a {type(draft).__name__}, not a SpecVLM draft "
                             "(model_type 'specvlm_draft')")
    draft.check_compatible(target)
    return draft.to(device).eval()


def _truncated_layers(spec: str) -> int | None:
    """K of `--assistant truncated:K` (`None` for a path / Hub id)."""
    if not spec.startswith(TRUNCATED_PREFIX):
        return None
    value = spec[len(TRUNCATED_PREFIX):]
    if not value.isdigit() or int(value) < 1:
        raise UserValueError(f"--assistant {spec!r}: expected {TRUNCATED_PREFIX}K with a positive integer K")
    return int(value)


def load_assistant(spec: str, target: Any, dtype: torch.dtype, device: str) -> tuple[Any, str]:
    """The `assisted` method's assistant from `--assistant` (`truncated:K` or a path / Hub id), with a description."""
    layers = _truncated_layers(spec)
    if layers is not None:
        from .assistant import build_truncated_assistant

        total = target.config.get_text_config().num_hidden_layers
        if layers >= total:
            raise UserValueError(f"--assistant {spec!r}: the target's language model has {total} layers; "
                                 f"choose K below {total}")
        return (build_truncated_assistant(target, layers),
                f"first {layers} of {total} layers of the target's language model (untrained early exit)")
    from transformers import AutoModelForCausalLM

    assistant = _from_pretrained("--assistant", spec, AutoModelForCausalLM.from_pretrained, dtype=dtype)
    return assistant.to(device).eval(), spec


def _oracle_depths(args: argparse.Namespace, names: list[str]) -> list[int]:
    """The `--oracle-depths` of the run, without repeats (none when `oracle` is not among the methods)."""
    return list(dict.fromkeys(args.oracle_depths)) if "oracle" in names else []


def _routing_draft(target: Any) -> Any:
    """An untrained SpecVLM draft built for `target`: it only routes `oracle` calls to the tree loop (the replay
    drafter proposes the tokens, the draft's weights are never used)."""
    from ..models import SpecVLMDraftModel

    parameter = target.get_output_embeddings().weight
    with torch.random.fork_rng(devices=[]):  # leaves the benchmark's random state alone
        torch.manual_seed(0)
        draft = SpecVLMDraftModel.from_target(target)
    return draft.to(device=parameter.device, dtype=parameter.dtype).eval()


def _check_pocket(want_draft: bool) -> None:
    """Before anything loads: the pocket VLM's packages, and its shipped draft when a SpecVLM method needs it."""
    require_pocket("specvlm bench without --target (the pocket VLM)", "or pass --target and --draft")
    if want_draft:
        from ..pocket.draft import DRAFT_DIR

        if not (DRAFT_DIR / "config.json").is_file():
            raise UserFileNotFoundError(
                f"the pocket VLM's trained draft is not in this installation ({DRAFT_DIR}); pass --draft PATH or "
                "reproduce it with `specvlm pocket train-draft`"
            )


def _load_pocket(dtype: torch.dtype, device: str, want_draft: bool):
    from ..pocket import load_pocket_draft, load_pocket_vlm

    target, processor = load_pocket_vlm(dtype=dtype)
    target = target.to(device).eval()
    draft = load_pocket_draft(target).to(device).eval() if want_draft else None
    return target, processor, draft


def _exact_choice(choice: str) -> bool | None:
    """`generate(..., exact_verification=)` of `--exact-verification` (`auto`: `None`, the loop's choice)."""
    return None if choice == "auto" else choice == "on"


def _run_settings(args: argparse.Namespace, prompts_file: Path, num_prompts: int,
                  variant_specs: list[tuple[str, str]]) -> dict[str, Any]:
    """The flags that decide what a record measures (compared by `--resume`, see [`RESUME_SETTINGS`])."""
    return {
        "target": args.target,
        "draft": args.draft,
        "compressor_drafts": {name: path for name, path in variant_specs},
        "assistant": args.assistant,
        "device": args.device,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
        "prompts_file": str(Path(prompts_file).resolve()),
        "num_prompts": num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "cap_new_tokens": args.cap_new_tokens,
        "repeats": args.repeats,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "chain_depth": args.chain_depth,
        "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
        "num_assistant_tokens": args.num_assistant_tokens,
        "num_threads": args.num_threads,
        "calibrate": args.calibrate,
        "exact_verification": args.exact_verification,
        "draft_dtype": getattr(args, "draft_dtype", None),
    }


def check_resumable(previous_meta: dict | None, settings: dict[str, Any], out: Path) -> None:
    """
    Refuses `--resume` when the earlier run in `out` measured with other settings (its records would not be
    comparable with the new ones); warns when its `meta.json` is missing and the settings cannot be compared.

    Raises:
        [`~specvlm_hf.errors.UserValueError`]: listing every setting that differs.
    """
    previous = (previous_meta or {}).get("settings")
    if not isinstance(previous, dict):
        print(f"[specvlm bench] warning: {out / 'meta.json'} has no settings of the earlier run; --resume cannot "
              "check that its records were measured with the same flags", file=sys.stderr)
        return
    differ = [f"{key}: {previous.get(key)!r} before, {settings.get(key)!r} now"
              for key in RESUME_SETTINGS if key in previous and previous.get(key) != settings.get(key)]
    if differ:
        raise UserValueError(
            f"--resume: the results in {out} were measured with other settings ({'; '.join(differ)}); rerun with the "
            "same flags, or choose another --out"
        )


def _order_records(records: list[dict], labels: list[str], settings: Any) -> list[dict]:
    """Records in report order (batch size, temperature, method as run); records of other settings (kept by
    `--resume`) after, in their order."""
    from .methods import record_label

    def position(values: list, value: Any) -> int:
        return values.index(value) if value in values else len(values)

    return sorted(records, key=lambda r: (
        position(list(settings.batch_sizes), r["batch_size"]),
        position([float(t) for t in settings.temperatures], float(r["temperature"])),
        position(labels, record_label(r)),
    ))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import specvlm_hf  # noqa: F401  (registers the draft and routes generate)

    from .methods import check_method_names, parse_variant_specs
    from .prompts import load_prompts
    from .report import (
        CONVENTIONS,
        hardware_info,
        prepare_output_dir,
        read_previous_run,
        software_versions,
        utc_now,
        write_records,
        write_results,
    )
    from .runner import BenchSettings, record_key

    # --- everything the user gave is checked before any model loads ---
    names = check_method_names(args.methods)
    variant_specs = parse_variant_specs(args.compressor_draft or [])
    if "specvlm_tree_compressor" not in names:
        variant_specs = []
    settings = BenchSettings(
        temperatures=args.temperature, batch_sizes=args.batch_size, repeats=args.repeats, seed=args.seed,
        top_k=args.top_k, top_p=args.top_p, cap_new_tokens=args.cap_new_tokens, noise_floor=args.noise_floor,
    )
    oracle_depths = _oracle_depths(args, names)
    wants_draft = any(name in ("specvlm_chain", "specvlm_tree") for name in names)
    # the compressor variants take the main draft's tree knobs (calibrated or its config) when there is one
    knobs_draft = bool(variant_specs) and (args.draft is not None or args.target is None)
    if args.target is None:
        _check_pocket((wants_draft or knobs_draft) and args.draft is None)
        if args.assistant is None and "assisted" in names:
            from ..pocket.assistant import POCKET_ASSISTANT_LAYERS

            args.assistant = f"{TRUNCATED_PREFIX}{POCKET_ASSISTANT_LAYERS}"
    else:
        check_model_name("--target", args.target)
        if wants_draft and args.draft is None:
            raise UserValueError("--draft is required with --target for the specvlm_* methods "
                                 "(or choose --methods without specvlm_chain / specvlm_tree)")
    if args.draft is not None:
        check_model_name("--draft", args.draft)
    for _, path in variant_specs:
        check_model_name("--compressor-draft", path)
    if args.assistant is not None and _truncated_layers(args.assistant) is None:
        check_model_name("--assistant", args.assistant)
    if args.prompts is not None:
        prompts_file = args.prompts
    else:
        from .prompts import DEFAULT_PROMPTS_PATH

        prompts_file = DEFAULT_PROMPTS_PATH
    prompts = load_prompts(prompts_file, default_max_new_tokens=args.max_new_tokens)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    out = prepare_output_dir(args.out, resume=args.resume)
    previous_records, previous_meta = read_previous_run(out) if args.resume else ([], None)
    # `auto` resolved (records measure the resolved dtype), checking the target's own projections where its config is
    # at hand
    dtype_choice = choose_dtype(args.dtype, args.device, linear_shapes=target_linear_shapes(args.target))
    args.dtype = dtype_choice.name
    draft_dtype_choice = choose_draft_dtype(args.draft_dtype, dtype_choice.dtype, args.device)
    args.draft_dtype = draft_dtype_choice.name
    run_settings = _run_settings(args, prompts_file, len(prompts), variant_specs)
    if previous_records:
        check_resumable(previous_meta, run_settings, out)
    else:
        previous_meta = None
    done = {record_key(r) for r in previous_records}
    print(f"[specvlm bench] dtype: {dtype_choice.name} ({dtype_choice.reason}); drafts: {draft_dtype_choice.name} "
          f"({draft_dtype_choice.reason})", file=sys.stderr)

    meta: dict[str, Any] = {
        "status": "loading models",
        "date": utc_now(),
        "hardware": hardware_info(args.device),
        "versions": software_versions(),
        "settings": run_settings,
        "resumed_records": len(previous_records),
        "device": args.device,
        "dtype": args.dtype,
        "dtype_reason": dtype_choice.reason,
        "draft_dtype": args.draft_dtype,
        "draft_dtype_reason": draft_dtype_choice.reason,
        "prompts_file": str(prompts_file),
        "num_prompts": len(prompts),
        "repeats": args.repeats,
        "temperatures": settings.temperatures,
        "batch_sizes": settings.batch_sizes,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "max_new_tokens_default": args.max_new_tokens,
        "cap_new_tokens": args.cap_new_tokens,
        "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
        "ttft_method": "plain generate with max_new_tokens=1 per batch of prompts and repetition (median)",
        "calibration": (previous_meta or {}).get("calibration"),
        "tree_knobs_used": (previous_meta or {}).get("tree_knobs_used"),
        "oracle_depths": oracle_depths or None,
        "noise_floor": (previous_meta or {}).get("noise_floor"),
        "conventions": CONVENTIONS,
    }
    records = list(previous_records)
    expected = expected_record_keys(names, variant_specs, settings, oracle_depths=oracle_depths)
    if previous_records and not expected - done:
        print(f"[specvlm bench] --resume: every record of this run is already in {out / 'results.json'}; "
              "nothing to measure (only the report is rewritten)", file=sys.stderr)
        write_results(out, records, {**(previous_meta or meta), "status": "complete"})
        return 0
    write_records(out, records, meta)  # results.json is valid JSON from the start, meta.json says what runs
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        _measure(args, names, variant_specs, settings, prompts, out, meta, records, done)
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        meta["status"] = "interrupted" if interrupted else f"failed ({type(error).__name__})"
        try:  # results.json already holds every finished record; the report shows them too
            if records:
                write_results(out, records, meta)
            else:
                write_records(out, records, meta)
        except Exception as report_error:  # noqa: BLE001  (the original error matters more)
            print(f"[specvlm bench] could not write the partial report: {report_error}", file=sys.stderr)
        if interrupted or (records and not isinstance(error, UserError)):
            print(f"[specvlm bench] {meta['status']}: {len(records)} record(s) kept in {out / 'results.json'}; "
                  "rerun the same command with --resume to run only the missing ones", file=sys.stderr)
        raise
    meta["status"] = "complete"
    written = write_results(out, records, meta)
    print(f"[specvlm bench] wrote {', '.join(str(p) for p in written.values())}")
    for record in records:
        print("  " + _summary_line(record))
    return 0


def expected_record_keys(names: list[str], variant_specs: list[tuple[str, str]], settings: Any,
                         methods: tuple[str, ...] | None = None, oracle_depths: Sequence[int] = ()) -> set[tuple]:
    """
    The [`~specvlm_hf.bench.runner.record_key`]s a run of `names` (plain `generate` included) will write, known
    before any model loads: one per method (one per compressor variant for `specvlm_tree_compressor`, one per depth of
    `oracle_depths` for `oracle`), temperature and batch size; `methods` keeps only those methods.
    """
    triples: list[tuple[str, str | None, int | None]] = [("generate", None, None)]
    for name in names:
        if name == "specvlm_tree_compressor":
            triples += [(name, variant, None) for variant, _ in variant_specs] or [(name, None, None)]
        elif name == "oracle":
            triples += [(name, None, int(depth)) for depth in oracle_depths]
        elif name != "generate":
            triples.append((name, None, None))
    return {(method, variant, depth, float(t), int(b)) for method, variant, depth in triples
            if methods is None or method in methods for t in settings.temperatures for b in settings.batch_sizes}


def _measure(
    args: argparse.Namespace,
    names: list[str],
    variant_specs: list[tuple[str, str]],
    settings: Any,
    prompts: list,
    out: Path,
    meta: dict[str, Any],
    records: list[dict],
    done: set[tuple],
) -> None:
    """Loads the models, calibrates the tree and runs the benchmark, saving `results.json` (with `meta.json`) after
    every finished group of records; `records` and `meta` are completed in place."""
    from .calibration import calibrate
    from .methods import TreeSettings, build_methods, compressor_summary
    from .prompts import render_batch
    from .report import write_records
    from .runner import run_benchmark

    dtype = DTYPES[args.dtype]
    wants_draft = any(name in ("specvlm_chain", "specvlm_tree") for name in names)
    knobs_draft = bool(variant_specs) and (args.draft is not None or args.target is None)
    started = time.perf_counter()
    assistant = assistant_note = None
    if args.target is None:
        target, processor, draft = _load_pocket(dtype, args.device, (wants_draft or knobs_draft) and args.draft is None)
        target_name = "pocket VLM (specvlm_hf.pocket: SmolLM2-135M-Instruct + EfficientNet-Lite0, LLaVA)"
        draft_name = args.draft or ("pocket draft (specvlm_hf.pocket.load_pocket_draft)" if draft is not None else None)
    else:
        target, processor = load_target(args.target, dtype, args.device, args.attn_implementation)
        target_name, draft_name, draft = args.target, args.draft, None
    if args.draft is not None and (wants_draft or knobs_draft):
        draft = load_draft(args.draft, target, dtype, args.device)
    compressor_drafts = {name: load_draft(path, target, dtype, args.device, "--compressor-draft")
                         for name, path in variant_specs}
    draft_dtype = DTYPES[args.draft_dtype]
    if draft is not None:
        draft = draft.to(draft_dtype)  # the target verifies every token in its own dtype (choose_draft_dtype)
    compressor_drafts = {name: variant.to(draft_dtype) for name, variant in compressor_drafts.items()}
    if compressor_drafts and all(compressor_summary(d) is None for d in compressor_drafts.values()):
        print("[specvlm bench] warning: no --compressor-draft has an elastic compressor; the specvlm_tree_compressor "
              "records only measure compressor-less drafts", file=sys.stderr)
    if args.assistant is not None and "assisted" in names:
        assistant, assistant_note = load_assistant(args.assistant, target, dtype, args.device)
    oracle_depths = _oracle_depths(args, names)
    oracle_draft = None
    if oracle_depths:  # any SpecVLM draft routes the replay; without one, an untrained draft built for the target
        oracle_draft = draft if draft is not None else _routing_draft(target)
    meta.update(
        status="running",
        target=target_name,
        draft=draft_name,
        draft_config_tree=None if draft is None else {
            "tree_top_k": draft.config.tree_top_k, "tree_depth": draft.config.tree_depth,
            "tree_total_tokens": draft.config.tree_total_tokens,
        },
        compressor_drafts={
            name: {"path": path, "compressor": compressor_summary(compressor_drafts[name])}
            for name, path in variant_specs
        },
        assistant=assistant_note,
        load_seconds=time.perf_counter() - started,
    )

    tree = None
    exact = _exact_choice(args.exact_verification)
    # the draft whose knobs (calibrated or from its config) every tree method uses: the main draft, else the first
    # compressor variant
    knob_source = draft if draft is not None else next(iter(compressor_drafts.values()), None)
    knob_note = "main draft" if knob_source is draft else f"compressor variant {next(iter(compressor_drafts), None)}"
    previous_knobs = meta.get("tree_knobs_used") if done else None
    tree_missing = bool(expected_record_keys(names, variant_specs, settings, TREE_METHODS) - done)
    if knob_source is not None and previous_knobs:
        # --resume: the knobs of the records already measured, so that every tree record of results.json shares them
        tree = TreeSettings(previous_knobs["tree_top_k"], previous_knobs["tree_depth"],
                            previous_knobs["tree_total_tokens"])
    elif knob_source is not None:
        tree = TreeSettings(knob_source.config.tree_top_k, knob_source.config.tree_depth,
                            knob_source.config.tree_total_tokens)
        meta.update(calibration=None, tree_knobs_used=None)
        if args.calibrate and tree_missing:
            device = target.get_output_embeddings().weight.device
            pilot = [render_batch(processor, [p], device, target.dtype) for p in prompts[: max(args.pilot_prompts, 1)]]
            calibration = calibrate(
                target, knob_source, pilot, budgets=args.pilot_budgets, max_nodes=args.max_tree_nodes,
                pilot_max_new_tokens=args.pilot_max_new_tokens, repeats=args.calibration_repeats,
                loop_kwargs={} if exact is None else {"exact_verification": exact},
                progress=None if args.no_progress else (lambda message: print(f"[specvlm bench] {message}",
                                                                             file=sys.stderr)),
            )
            tree = TreeSettings(calibration.top_k, calibration.choice.depth, calibration.choice.total_tokens)
            meta["calibration"] = calibration.to_dict()
        meta["tree_knobs_used"] = {
            "tree_top_k": tree.top_k, "tree_depth": tree.depth, "tree_total_tokens": tree.total_tokens,
            "source": "calibrated" if meta["calibration"] is not None else "draft config", "draft": knob_note,
        }
    calibrated = bool(meta.get("tree_knobs_used")) and meta["tree_knobs_used"].get("source") == "calibrated"

    methods = build_methods(
        names, draft=draft, compressor_drafts=compressor_drafts, assistant=assistant, assistant_note=assistant_note,
        tree=tree, chain_depth=args.chain_depth, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        num_assistant_tokens=args.num_assistant_tokens, oracle_draft=oracle_draft, oracle_depths=oracle_depths,
        exact_verification=exact,
    )
    labels = [m.label for m in methods]
    meta["methods"] = [m.name for m in methods]
    write_records(out, records, meta)

    def save(group: list[dict]) -> None:
        for record in group:
            if calibrated and record["method"] in TREE_METHODS:
                record["calibrated"] = True
        records[:] = _order_records(records + group, labels, settings)
        write_records(out, records, meta)

    outcome = run_benchmark(target, processor, prompts, methods, settings, progress=not args.no_progress, done=done,
                            on_records=save)
    meta["timed_calls"] = len(outcome.runs)
    if outcome.noise_floor is not None:  # else (float32, --no-noise-floor, T = 0 already measured) as it was
        meta["noise_floor"] = outcome.noise_floor
    write_records(out, records, meta)


def _summary_line(record: dict) -> str:
    from .methods import record_label

    def show(value: Any, suffix: str = "") -> str:
        return "–" if value is None else f"{value:.2f}{suffix}"

    line = (
        f"batch {record['batch_size']} {record_label(record):<24} T={record['temperature']:<4g} "
        f"speedup {show(record.get('speedup'), 'x'):>6}  accept {show(record.get('mean_accept_len')):>5}  "
        f"exact {show(record.get('exact_match'))}"
    )
    if record.get("divergences"):
        line += f"  diverging rows {len(record['divergences'])}"
    if record.get("bound") is not None:
        line += (f"  bound {record['bound']:.2f}x (fraction {show(record.get('fraction_of_bound'))}, decode "
                 f"{show(record.get('decode_fraction_of_bound'))}; end to end {show(record.get('end_to_end_bound'), 'x')}"
                 f", fraction {show(record.get('fraction_of_end_to_end_bound'))})")
    if record.get("note") and not record.get("available"):
        line += f"  ({record['note']})"
    return line


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
