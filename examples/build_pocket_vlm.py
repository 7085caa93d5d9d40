# /// script
# requires-python = ">=3.10"
# dependencies = ["specvlm-hf[pocket]"]
# ///
"""Build (or reuse) the offline pocket VLM and describe the held-out benchmark photos.

```bash
pip install -e ".[pocket]"
python examples/build_pocket_vlm.py                  # build into $SPECVLM_HF_CACHE/pocket-vlm, then describe 3 photos
python examples/build_pocket_vlm.py --force --dtype float32
```

The same build is available as `specvlm pocket build`; `specvlm pocket train-projector` retrains the projector.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from specvlm_hf.pocket import build_pocket_vlm, load_pocket_vlm
from specvlm_hf.pocket.data import load_bench_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is cached")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    # ---------------------------------------------------------------- build (no network: all from packages)
    path = build_pocket_vlm(args.cache_dir, dtype=dtype, force=args.force)
    print(f"pocket VLM at {path}")
    model, processor = load_pocket_vlm(dtype=dtype, cache_dir=path)

    # ---------------------------------------------------------------- describe held-out photos
    rows = [row for row in load_bench_prompts() if len(row["images"]) == 1][: args.num_prompts]
    for row in rows:
        content = [{"type": "image"}, {"type": "text", "text": row["prompt"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=Image.open(row["images"][0]), text=prompt, return_tensors="pt")
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        print(f"\n[{row['images'][0].name}] {row['prompt']}")
        print(processor.decode(new_tokens, skip_special_tokens=True))
        print(f"({len(new_tokens)} tokens, {len(new_tokens) / seconds:.1f} tokens/s)")


if __name__ == "__main__":
    main()
