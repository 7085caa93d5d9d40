"""The pocket VLM's assistant for transformers' assisted generation: its own first layers.

No smaller SmolLM2 exists offline, so the `assisted` baseline of `specvlm bench` on the pocket VLM is the
truncated-layer assistant of `specvlm_hf.bench.assistant` (the generic builder, measurement and choice live there and
are re-exported here): the first [`POCKET_ASSISTANT_LAYERS`] decoder layers of the VLM's language model with its final
norm and tied LM head. Image placeholder ids are ordinary tokens for it; the placeholder row of the embedding is the
mean embedding, see `specvlm_hf.pocket.build`.

Choice of `k` for the pocket VLM ([`POCKET_ASSISTANT_LAYERS`] = 2), with `specvlm_hf.bench.assistant`'s
[`measure_truncation_agreement`] and [`choose_assistant_layers`]. Measured 2026-11-22 (bf16, CPU, 32 new
tokens per prompt, 151 scored tokens, `blind=False`, i.e. the assistant credited with the image features — an upper
bound on what transformers' blind assistant gets):

| k | 2 | 4 | 6 | 8 | 10 | 12 | 15 | 18 | 21 | 24 | 27 |
|---|---|---|---|---|---|---|---|---|---|---|---|
| top-1 agreement | .073 | .060 | .046 | .053 | .066 | .066 | .066 | .126 | .219 | .285 | .404 |
| cost per drafted token (decode = 1) | .26 | .32 | .37 | .42 | .47 | .53 | .61 | .68 | .76 | .84 | .92 |
| modelled speedup (best of 1–8 drafted tokens) | **.85** | .81 | .76 | .74 | .72 | .70 | .66 | .67 | .69 | .70 | .73 |

An untrained early exit of SmolLM2-135M is a poor draft at every depth (the logit lens of a small model is weak until
the last layers), so no `k` reaches break-even; agreement is flat (≈5–7 %) up to `k = 15`, where the cheapest depth is
the least slow, and only the last layers agree often, at almost the cost of the target. `k = 2` is therefore the
default; `specvlm bench --assistant truncated:K` benchmarks any other depth. `python -m specvlm_hf.pocket.assistant`
reruns the measurement the way transformers runs the assistant (`blind=True`: no image features, so agreement can
only be lower on the image prompts).

Example:

```python
>>> from specvlm_hf.pocket import load_pocket_vlm
>>> from specvlm_hf.pocket.assistant import load_pocket_assistant
>>> target, processor = load_pocket_vlm()
>>> assistant = load_pocket_assistant(target)  # build_truncated_assistant(target, POCKET_ASSISTANT_LAYERS)
>>> out = target.generate(**inputs, assistant_model=assistant, max_new_tokens=64, do_sample=False)
```
"""

from __future__ import annotations

import json

from transformers import LlamaForCausalLM, PreTrainedModel

from ..bench.assistant import (  # re-exported: the generic part moved to the bench (issue #9, item 7)
    CALIBRATION_PROMPTS,
    build_truncated_assistant,
    calibration_images,
    choose_assistant_layers,
    measure_truncation_agreement,
)

__all__ = [
    "CALIBRATION_PROMPTS",
    "POCKET_ASSISTANT_LAYERS",
    "build_truncated_assistant",
    "calibration_images",
    "choose_assistant_layers",
    "load_pocket_assistant",
    "measure_truncation_agreement",
]

#: Decoder layers kept by the pocket VLM's default assistant (of SmolLM2-135M's 30); see the module docstring for the
#: measurement behind it.
POCKET_ASSISTANT_LAYERS = 2


def load_pocket_assistant(target: PreTrainedModel, num_layers: int = POCKET_ASSISTANT_LAYERS) -> LlamaForCausalLM:
    """The pocket VLM's default assistant for `specvlm bench`'s `assisted` method (first `num_layers` layers)."""
    return build_truncated_assistant(target, num_layers)


if __name__ == "__main__":  # pragma: no cover - manual measurement
    import torch

    from . import load_pocket_vlm

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, proc = load_pocket_vlm(dtype=torch.bfloat16)
    layers = [2, 4, 6, 8, 10, 12, 15, 18, 21, 24, 27]
    print(json.dumps(measure_truncation_agreement(model, proc, layers=layers), indent=2))
