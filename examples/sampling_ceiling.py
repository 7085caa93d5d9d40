"""
How many tokens per cycle could *any* draft get accepted when sampling from this target? The ceiling of a perfect
draft whose children at every tree node are the target's own k most likely tokens (`specvlm_hf.bench.ceiling`):
it depends only on the target's entropy at the chosen temperature, so it says whether an acceptance goal under
sampling is reachable before anyone trains a draft for it.

    python examples/sampling_ceiling.py --out ceiling-pocket                  # pocket VLM, committed bench prompts
    python examples/sampling_ceiling.py --target my-org/my-vlm --temperature 0.7 --ks 1 4 8 --depths 4 6

Writes `ceiling.json` and `ceiling.md` (one row per k: the share of sampled tokens among the target's top-k, then
the ceiling at every depth) into `--out` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specvlm_hf.bench.ceiling import DEFAULT_CEILING_DEPTHS, DEFAULT_CEILING_KS, sampling_ceiling
from specvlm_hf.bench.cli import load_draft, load_target
from specvlm_hf.bench.prompts import DEFAULT_PROMPTS_PATH, load_prompts
from specvlm_hf.bench.report import hardware_info, software_versions
from specvlm_hf.demo import positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="model path or Hub id (default: the pocket VLM)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_PATH,
                        help="bench prompts file (JSONL; default: the committed bench prompts)")
    parser.add_argument("--draft", default=None,
                        help="a SpecVLM draft whose vocabulary coverage is reported too (default: the shipped pocket "
                        "draft when --target is not given)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (default: 1.0; 0 decodes greedily: the ceiling is then depth + 1 "
                        "and only the draft-vocabulary coverage is informative)")
    parser.add_argument("--ks", type=positive_int, nargs="+", default=list(DEFAULT_CEILING_KS),
                        help="children per tree node to evaluate")
    parser.add_argument("--depths", type=positive_int, nargs="+", default=list(DEFAULT_CEILING_DEPTHS),
                        help="tree depths to evaluate")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="cap on each prompt's tokens")
    parser.add_argument("--seed", type=int, default=0, help="base seed (prompt i samples with seed + i)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=Path("sampling-ceiling"), help="output folder")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    prompts = load_prompts(args.prompts)  # checked before any model loads

    draft = None
    if args.target is None:
        from specvlm_hf.pocket import load_pocket_draft, load_pocket_vlm

        target, processor = load_pocket_vlm(dtype=torch.float32)
        if args.draft is None:
            draft = load_pocket_draft(target)
    else:
        target, processor = load_target(args.target, torch.float32, "cpu")
    if args.draft is not None:
        draft = load_draft(args.draft, target, torch.float32, "cpu")
    draft_vocab = getattr(draft, "d2t", None) if draft is not None else None  # None: the draft has the full head
    started = time.perf_counter()
    ceiling = sampling_ceiling(
        target.eval(), processor, prompts, temperature=args.temperature, ks=args.ks, depths=args.depths,
        max_new_tokens=args.max_new_tokens, seed=args.seed, draft_vocab=draft_vocab,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        **ceiling.to_dict(),
        "target": args.target or "pocket VLM",
        "draft": args.draft or ("shipped pocket draft" if draft is not None else None),
        "prompts_file": str(args.prompts),
        "dtype": "float32",
        "seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware_info(),
        "versions": software_versions(),
    }
    (args.out / "ceiling.json").write_text(json.dumps(record, indent=2) + "\n")
    table = ceiling.to_markdown()
    header = (f"Sampling ceiling, T={args.temperature:g}, {ceiling.prompts} prompts, {ceiling.tokens} tokens, "
              f"{record['target']}, fp32 ({record['date']})\n\n")
    (args.out / "ceiling.md").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
