"""A same-tokenizer assistant for transformers' assisted generation: the target's own first layers.

transformers' `generate(..., assistant_model=small_lm)` needs a small causal LM that shares the target's tokenizer.
When none exists, `specvlm bench --assistant truncated:K` builds one from the target itself
([`build_truncated_assistant`]): a `LlamaForCausalLM` made of the first `K` decoder layers of the target's language
model, followed by its final norm and its (tied) LM head, i.e. an untrained "early exit" of the target. The assistant
**shares** the target's tensors (no copy, no extra weight memory) and sees the prompt's image placeholder ids as
ordinary tokens (it has no vision tower).

Choosing `K`: [`measure_truncation_agreement`] greedy-decodes [`CALIBRATION_PROMPTS`] (three text prompts and three
PIL-drawn images, disjoint from the benchmark prompts) with the full model and scores, for each `K`, how often the
final norm + head applied after layer `K` predict the target's next token; [`choose_assistant_layers`] turns that into
a modelled speedup. The pocket VLM's default and its measurement are in `specvlm_hf.pocket.assistant`
(`POCKET_ASSISTANT_LAYERS`).

Example:

```python
>>> from specvlm_hf.bench.assistant import build_truncated_assistant
>>> assistant = build_truncated_assistant(target, num_layers=2)
>>> out = target.generate(**inputs, assistant_model=assistant, max_new_tokens=64, do_sample=False)
```
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel

__all__ = [
    "CALIBRATION_PROMPTS",
    "build_truncated_assistant",
    "calibration_images",
    "choose_assistant_layers",
    "measure_truncation_agreement",
]

#: Non-benchmark prompts used to choose `k`: `(image kind or None, prompt)`; images are drawn by `calibration_images`.
CALIBRATION_PROMPTS: tuple[tuple[str | None, str], ...] = (
    (None, "Write a short story about a robot who learns to paint."),
    (None, "List three tips for staying focused while studying."),
    (None, "What is the capital of France? Answer in one sentence and add a fact about it."),
    ("circle", "Describe the image."),
    ("stripes", "What do you see in this picture?"),
    ("text", "What is written in this image?"),
)


def _llama_like(text_model: nn.Module) -> bool:
    return all(hasattr(text_model, name) for name in ("embed_tokens", "layers", "norm"))


def build_truncated_assistant(target: PreTrainedModel, num_layers: int) -> LlamaForCausalLM:
    """
    Builds a `LlamaForCausalLM` from the first `num_layers` decoder layers of `target`'s language model.

    The returned model shares the target's embedding, decoder layers, final norm and LM head (no weights are copied);
    it has the target's text config with `num_hidden_layers=num_layers`, and a copy of the target's generation config
    so that it stops on the same tokens.

    Args:
        target ([`~transformers.PreTrainedModel`]):
            A VLM (e.g. `LlavaForConditionalGeneration`) or causal LM whose text config is a Llama config
            (`model_type == "llama"`, as SmolLM2's).
        num_layers (`int`):
            Decoder layers to keep, `1 <= num_layers <= text_config.num_hidden_layers`.

    Returns:
        [`~transformers.LlamaForCausalLM`] in eval mode, on the target's device and in its dtype.
    """
    text_config = target.config.get_text_config()
    if text_config.model_type != "llama":
        raise ValueError(
            f"a truncated-layer assistant needs a Llama text model; {target.config.model_type!r} has a "
            f"{text_config.model_type!r} text model. Pass an assistant checkpoint instead."
        )
    total = text_config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    language_model = target.get_decoder() if hasattr(target, "get_decoder") else None
    if language_model is None or not _llama_like(language_model):
        language_model = getattr(getattr(target, "model", None), "language_model", None) or target.model
    if not _llama_like(language_model):  # pragma: no cover - guards unusual wrappers
        raise ValueError(f"cannot find the decoder layers of {type(target).__name__}")

    values = {k: v for k, v in text_config.to_dict().items() if k not in ("_name_or_path", "architectures")}
    values.update(num_hidden_layers=num_layers, tie_word_embeddings=True)
    if isinstance(values.get("layer_types"), list):
        values["layer_types"] = values["layer_types"][:num_layers]
    config = type(text_config).from_dict(values)
    param = next(target.parameters())
    with torch.device("meta"):
        assistant = LlamaForCausalLM(config)
    # share the target's modules (the rotary embedding depends only on head size and RoPE settings, which are equal)
    assistant.model.embed_tokens = language_model.embed_tokens
    assistant.model.layers = nn.ModuleList(list(language_model.layers[:num_layers]))
    assistant.model.norm = language_model.norm
    assistant.model.rotary_emb = language_model.rotary_emb
    assistant.lm_head = target.get_output_embeddings()
    assistant.to(param.device)
    assistant.config.dtype = param.dtype
    assistant.generation_config = copy.deepcopy(target.generation_config)
    return assistant.eval()


def calibration_images(size: int = 224) -> dict[str, object]:
    """Simple PIL drawings used by [`CALIBRATION_PROMPTS`] (never benchmark photos): circle, stripes, text."""
    from PIL import Image, ImageDraw

    circle = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(circle).ellipse((40, 40, size - 40, size - 40), fill=(220, 30, 30))
    stripes = Image.new("RGB", (size, size), (30, 70, 220))
    draw = ImageDraw.Draw(stripes)
    for x in range(0, size, 32):
        draw.rectangle((x, 0, x + 15, size), fill=(245, 215, 30))
    text = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(text).text((30, size // 2 - 10), "HELLO WORLD", fill="black")
    return {"circle": circle, "stripes": stripes, "text": text}


@torch.no_grad()
def measure_truncation_agreement(
    target: PreTrainedModel,
    processor,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    prompts: Sequence[tuple[str | None, str]] = CALIBRATION_PROMPTS,
    blind: bool = True,
) -> dict:
    """
    Top-1 agreement of each truncated assistant with the full target, teacher forced on the target's greedy output.

    For every prompt the target greedily generates `max_new_tokens`; one forward over prompt + continuation with
    `output_hidden_states=True` then gives, after every layer `k`, the assistant's prediction (final norm + head). The
    agreement of layer `k` is the fraction of generated positions where it equals the target's token — the per-token
    acceptance probability `p_k` of greedy assisted generation. Also reports the cost of one drafted token of each `k`
    relative to a target decode step, from matmul parameter counts (`k` layers + LM head over all layers + LM head):
    wall-clock ratios on a shared CPU are too noisy to rank neighbouring `k`.

    Args:
        target ([`~transformers.PreTrainedModel`]): the (Llama-text) target.
        processor: its processor (chat template + images).
        layers (`Sequence[int]`, *optional*): values of `k` to report (default: every layer).
        max_new_tokens (`int`, *optional*, defaults to 32): tokens generated per prompt.
        prompts: `(image kind or None, prompt)` pairs; image kinds are keys of [`calibration_images`].
        blind (`bool`, *optional*, defaults to `True`): score the assistant as transformers runs it, on token ids only
            (image placeholders embedded as tokens, no image features). `False` scores the target's own hidden states
            (the assistant would see the image): an upper bound.

    Returns:
        `dict` with `agreement` (`{k: p_k}`), `tokens` (positions scored), `relative_cost` (`{k: c_k}`) and
        `choice` (see [`choose_assistant_layers`]).
    """
    text_config = target.config.get_text_config()
    total = text_config.num_hidden_layers
    layers = list(layers) if layers is not None else list(range(1, total + 1))
    images = calibration_images()
    probe = build_truncated_assistant(target, total)
    head = target.get_output_embeddings()
    agree = {k: 0 for k in layers}
    scored = 0
    for kind, prompt in prompts:
        content = ([{"type": "image"}] if kind else []) + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[images[kind]] if kind else None, text=text, return_tensors="pt")
        inputs = {key: value.to(target.device) for key, value in inputs.items()}
        sequences = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        n_prompt = inputs["input_ids"].shape[1]
        if sequences.shape[1] <= n_prompt:
            continue
        if blind:
            out = probe.model(input_ids=sequences, output_hidden_states=True, use_cache=False)
        else:
            full = {**inputs, "input_ids": sequences, "attention_mask": torch.ones_like(sequences)}
            out = target(**full, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states  # embeddings, then the output of each layer
        # position t predicts token t + 1: score positions n_prompt - 1 .. len - 2 (the generated tokens)
        targets = sequences[0, n_prompt:]
        for k in layers:
            states = probe.model.norm(hidden[k][0, n_prompt - 1 : -1]) if k < total else None
            predicted = (head(states) if states is not None else _full_logits(target, probe, sequences, inputs, blind,
                                                                              n_prompt)).argmax(-1)
            agree[k] += int((predicted == targets).sum())
        scored += int(targets.numel())
    agreement = {k: agree[k] / scored if scored else 0.0 for k in layers}
    layer_params = sum(p.numel() for p in probe.model.layers[0].parameters())
    head_params = head.weight.numel()
    relative_cost = {k: (k * layer_params + head_params) / (total * layer_params + head_params) for k in layers}
    return {
        "agreement": agreement,
        "tokens": scored,
        "relative_cost": relative_cost,
        "blind": blind,
        "max_new_tokens": max_new_tokens,
        "choice": choose_assistant_layers(agreement, relative_cost),
    }


def _full_logits(target, probe, sequences, inputs, blind, n_prompt) -> torch.Tensor:
    """Logits of the untruncated model at the generated positions (the last hidden state is already normed)."""
    if blind:
        logits = probe(input_ids=sequences, use_cache=False).logits
    else:
        logits = target(**{**inputs, "input_ids": sequences, "attention_mask": torch.ones_like(sequences)}).logits
    return logits[0, n_prompt - 1 : -1]


def choose_assistant_layers(
    agreement: dict[int, float], relative_cost: dict[int, float], max_draft_tokens: int = 8
) -> dict:
    """
    Picks the depth `k` with the best modelled speedup of greedy assisted generation.

    With per-token acceptance `p_k`, `g` drafted tokens per cycle emit `(1 - p^(g+1)) / (1 - p)` tokens and cost
    `g * c_k + 1` target-decode units (verification counted as one decode, which favours the assistant). The choice
    maximises that ratio over `k` and `g = 1 .. max_draft_tokens`.

    Args:
        agreement (`dict[int, float]`): `p_k` per depth.
        relative_cost (`dict[int, float]`): cost `c_k` of one drafted token relative to a target decode step.
        max_draft_tokens (`int`, *optional*, defaults to 8): largest `g` considered.

    Returns:
        `dict` with `layers` (the chosen `k`), `draft_tokens` (its best `g`), `modelled_speedup`, and
        `modelled_speedup_per_layers` (`{k: best ratio}`).
    """
    if not agreement:
        raise ValueError("agreement is empty")
    best_per_k: dict[int, tuple[float, int]] = {}
    for k, p in agreement.items():
        options = []
        for g in range(1, max_draft_tokens + 1):
            emitted = sum(p**i for i in range(g + 1))
            options.append((emitted / (g * relative_cost[k] + 1.0), g))
        best_per_k[k] = max(options)
    k_best = max(best_per_k, key=lambda k: (best_per_k[k][0], -k))
    return {
        "layers": k_best,
        "draft_tokens": best_per_k[k_best][1],
        "modelled_speedup": best_per_k[k_best][0],
        "modelled_speedup_per_layers": {k: value for k, (value, _) in sorted(best_per_k.items())},
    }
