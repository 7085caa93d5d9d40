"""`specvlm demo`: one prompt with and without speculation, printing both outputs, the speedup and the acceptance.

With the pocket VLM available (`pip install -e ".[pocket]"`, see `specvlm pocket build`) the demo runs the real local
VLM and its shipped trained draft on a held-out photo; otherwise (or with `--tiny`) it runs a tiny random LLaVA built in
code, which still shows token-identical output but no speedup (a random draft accepts almost nothing).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch


@dataclass
class DemoResult:
    """Outcome of one demo run."""

    model: str
    plain_text: str
    spec_text: str
    identical: bool
    plain_seconds: float
    spec_seconds: float
    mean_accept_len: float | None
    new_tokens: int

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.spec_seconds if self.spec_seconds else float("nan")


def _timed_generate(target, inputs: dict, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = target.generate(**inputs, **kwargs)
    return out, time.perf_counter() - start


def compare(target, draft, inputs: dict, decode, max_new_tokens: int, model_name: str) -> DemoResult:
    """Runs plain greedy `generate` and the same call with `assistant_model=draft` (after one warm-up each)."""
    common = dict(max_new_tokens=max_new_tokens, do_sample=False)
    target.generate(**inputs, max_new_tokens=4, do_sample=False)
    target.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
    plain, plain_s = _timed_generate(target, inputs, **common)
    spec, spec_s = _timed_generate(target, inputs, assistant_model=draft, return_dict_in_generate=True, **common)
    n_prompt = inputs["input_ids"].shape[1]
    return DemoResult(
        model=model_name,
        plain_text=decode(plain[0, n_prompt:]),
        spec_text=decode(spec.sequences[0, n_prompt:]),
        identical=plain.tolist() == spec.sequences.tolist(),
        plain_seconds=plain_s,
        spec_seconds=spec_s,
        mean_accept_len=spec.speculation.mean_accept_len,
        new_tokens=int(plain.shape[1] - n_prompt),
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


def resolve_dtype(name: str) -> torch.dtype:
    """`"auto"` -> bf16 on CPUs with native bf16 matrix units, fp32 otherwise; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return getattr(torch, name)


def run_pocket(max_new_tokens: int = 96, dtype: torch.dtype = torch.bfloat16) -> DemoResult:
    """Demo on the pocket VLM (real SmolLM2-135M-Instruct + EfficientNet-Lite0) with its shipped trained draft."""
    from .pocket import demo_inputs, load_pocket_draft, load_pocket_vlm

    target, processor = load_pocket_vlm(dtype=dtype)
    draft = load_pocket_draft(target)
    inputs = demo_inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    name = f"pocket VLM (SmolLM2-135M + EfficientNet-Lite0), {str(dtype).removeprefix('torch.')}"
    return compare(target, draft, inputs, decode, max_new_tokens, name)


def pocket_available() -> bool:
    """True when the pocket VLM's packages and shipped draft are installed."""
    try:
        from .pocket import pocket_ready
    except ImportError:
        return False
    return pocket_ready()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specvlm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use the tiny random LLaVA even if the pocket VLM is available.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Tokens to generate (default 96 pocket / 48 tiny).")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="Pocket VLM dtype; auto = bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), float32 otherwise.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    use_pocket = not args.tiny and pocket_available()
    if not args.tiny and not use_pocket:
        print("[specvlm demo] pocket VLM not installed (pip install -e '.[pocket]'); running the tiny random demo.")
    kwargs = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    result = run_pocket(dtype=resolve_dtype(args.dtype), **kwargs) if use_pocket else run_tiny(**kwargs)
    print(f"model: {result.model}")
    print(f"\n--- plain generate ({result.plain_seconds:.2f} s) ---\n{result.plain_text}")
    print(f"\n--- generate(..., assistant_model=draft) ({result.spec_seconds:.2f} s) ---\n{result.spec_text}")
    accept = f"{result.mean_accept_len:.2f}" if result.mean_accept_len is not None else "n/a"
    print(
        f"\nidentical: {result.identical} | new tokens: {result.new_tokens} | speedup: {result.speedup:.2f}x | "
        f"mean acceptance length (bonus token included): {accept}"
    )
    return 0 if result.identical else 1
