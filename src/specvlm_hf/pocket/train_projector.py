"""Train the pocket VLM's projector on CPU (language model and vision tower frozen).

The only trainable weights are `multi_modal_projector` (1280→576→576 MLP, ≈1.07M parameters). CPU time affords a
few thousand examples, far too few to learn a thousand visual concepts from captions alone, so the projector starts
from [`imagenet_projector_init`]: the tower's ImageNet classifier, applied to each visual token, is turned into a
mixture of the word embeddings of the ImageNet class names found there. Captions then refine it: each example is the
SmolLM2 chat prompt `[image] + instruction` followed by a caption from [`~specvlm_hf.pocket.data.CaptionMixture`],
and the loss is next-token cross-entropy on the caption tokens only. The end-of-turn token is not a target, so after
the caption the language model keeps its own answer length and style. The result is written to
`specvlm_hf/assets/pocket/projector.safetensors` with `projector_provenance.json`.

Reproduce the committed projector with `specvlm pocket train-projector` (or `python -m specvlm_hf.pocket.cli
train-projector`).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaProcessor

from .build import ASSETS_DIR, PROJECTOR_FILE, PROJECTOR_PROVENANCE_FILE, compose_pocket_vlm, package_versions
from .data import (
    BENCH_PHOTOS,
    TRAIN_INSTRUCTIONS,
    CaptionMixture,
    data_sources,
    default_data_dir,
    fetch_imagenet_class_names,
)

SAMPLE_PHOTOS = ("chelsea", "coffee", "rocket")
SAMPLE_PROMPT = "Describe the image."
CALIBRATION_INDEX_OFFSET = 10_000_000  # calibration images come from another part of the deterministic stream
IMAGENET_DOG_CLASSES = range(151, 269)  # 118 dog breeds of ImageNet-1k, left out of the initialisation


@dataclass
class ProjectorTrainingConfig:
    """Hyper-parameters of [`train_projector`].

    Args:
        steps (`int`): optimizer steps.
        batch_size (`int`): examples per step.
        imagenet_init (`bool`): start from [`imagenet_projector_init`] instead of a random projector.
        init_threshold (`float`): ImageNet logit a class must exceed on a visual token to contribute to it.
        learning_rate (`float`): peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        warmup_steps (`int`): warm-up steps.
        seed (`int`): seeds the data stream, the instructions and torch.
        num_threads (`int`, *optional*): torch threads; 1 is fastest on shared 2-core machines (None: torch's default).
        max_minutes (`float`, *optional*): safety stop for slow machines: end the caption stage (recorded in the
            provenance) once training has run this long (None: never).
        data_dir (`str`, *optional*): cache for downloaded data; defaults to `default_data_dir()`.
        output_dir (`str`): where `projector.safetensors` and `projector_provenance.json` are written.
        sample_max_new_tokens (`int`): greedy tokens generated on held-out photos before and after training (0: skip).
        sample_photos (`tuple[str, ...]`): names of the [`BENCH_PHOTOS`] described before and after training.
    """

    steps: int = 260
    batch_size: int = 8
    imagenet_init: bool = True
    init_threshold: float = 4.0
    learning_rate: float = 5e-4
    warmup_steps: int = 12
    seed: int = 0
    num_threads: int | None = 1
    max_minutes: float | None = 20.0
    data_dir: str | None = None
    output_dir: str = str(ASSETS_DIR)
    sample_max_new_tokens: int = 32
    sample_photos: tuple[str, ...] = field(default=SAMPLE_PHOTOS)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError("steps and batch_size must be >= 1, warmup_steps >= 0 and learning_rate > 0")
        unknown = set(self.sample_photos) - {spec.name for spec in BENCH_PHOTOS}
        if unknown:
            raise ValueError(f"sample_photos must be benchmark photos, got unknown {sorted(unknown)}")


def _example_ids(
    processor: LlavaProcessor, image: Image.Image, caption: str, instruction: str
) -> tuple[list[int], list[int], torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    encoded = processor(images=image, text=prompt, return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()
    caption_ids = processor.tokenizer(caption, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + caption_ids
    return prompt_ids + caption_ids, labels, encoded["pixel_values"][0]


def collate(
    processor: LlavaProcessor, examples: list[tuple[Image.Image, str]], rng: random.Random
) -> dict[str, torch.Tensor]:
    """Right-padded batch: `input_ids`, `attention_mask`, `labels` (caption tokens only), `pixel_values`.

    Each example gets an instruction drawn from [`TRAIN_INSTRUCTIONS`] with `rng`.
    """
    rows = [_example_ids(processor, image, caption, rng.choice(TRAIN_INSTRUCTIONS)) for image, caption in examples]
    length = max(len(ids) for ids, _, _ in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _, _ in rows])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab, _ in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in rows])
    pixel_values = torch.stack([pixels for _, _, pixels in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


@dataclass
class SharedPrefix:
    """Key/value cache of the tokens every training example starts with (system prompt and user header).

    The prefix does not depend on the image, so it is computed once without gradients and reused by every step,
    which removes about a quarter of the language-model work of a step without changing the loss.

    Args:
        input_ids (`torch.Tensor` of shape `(prefix_length,)`): the shared tokens.
        key_values (`list[tuple[torch.Tensor, torch.Tensor]]`): per layer, keys and values of shape
            `(1, num_key_value_heads, prefix_length, head_dim)`.
    """

    input_ids: torch.Tensor
    key_values: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: LlavaForConditionalGeneration, input_ids: torch.Tensor) -> SharedPrefix:
        """Runs the language model on `input_ids` (1-D) and keeps its cache."""
        cache = model.model.language_model(input_ids=input_ids[None], use_cache=True).past_key_values
        return cls(input_ids=input_ids, key_values=[(layer.keys, layer.values) for layer in cache.layers])

    def cache(self, batch_size: int, model: LlavaForConditionalGeneration) -> DynamicCache:
        """A fresh cache holding the prefix for `batch_size` rows (the stored tensors are never modified)."""
        expanded = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.key_values]
        return DynamicCache(ddp_cache_data=expanded, config=model.config.text_config)


def caption_loss(
    model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor], prefix: SharedPrefix | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions; the LM head runs only where a label exists.

    Args:
        model ([`LlavaForConditionalGeneration`]): the pocket VLM.
        batch (`dict[str, torch.Tensor]`): output of [`collate`].
        prefix ([`SharedPrefix`], *optional*): cached tokens that every row of `batch` starts with (same loss, less
            work).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    cache = None
    if prefix is not None:
        length = len(prefix.input_ids)
        if not torch.equal(input_ids[:, :length], prefix.input_ids.expand(len(input_ids), -1)):
            raise ValueError("every row of the batch must start with the shared prefix")
        input_ids, labels = input_ids[:, length:], labels[:, length:]
        cache = prefix.cache(len(input_ids), model)
    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"], past_key_values=cache
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets.ne(-100)
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def describe_photos(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, names: tuple[str, ...], max_new_tokens: int
) -> dict[str, str]:
    """Greedy answers of the model to "Describe the image." for benchmark photos, keyed by photo name."""
    specs = {spec.name: spec for spec in BENCH_PHOTOS}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SAMPLE_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers = {}
    for name in names:
        inputs = processor(images=specs[name].load(), text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers[name] = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


@torch.no_grad()
def imagenet_projector_init(
    model: LlavaForConditionalGeneration,
    tokenizer,
    class_names: list[str],
    calibration_pixels: torch.Tensor,
    threshold: float = 4.0,
) -> list[str]:
    """Initialises the projector from the tower's ImageNet classifier so that visual tokens read as class-name words.

    The tower's `fc` is linear, so applied to one visual token it gives that location's ImageNet logits. `linear_1`
    becomes the `fc` rows of `hidden` classes (dog breeds excluded; shortest tokenised names first), shifted by
    `threshold` so that GELU passes only confident classes; `linear_2` maps each class to the mean input embedding of
    its name's tokens, scaled so that projected tokens have the median norm of the embedding matrix on
    `calibration_pixels`. Every visual token then starts as a mixture of the words for what ImageNet sees there, which
    the caption loss refines.

    Args:
        model ([`LlavaForConditionalGeneration`]): the pocket VLM (its projector is overwritten).
        tokenizer: the SmolLM2 tokenizer.
        class_names (`list[str]`): the 1,000 ImageNet-1k names in classifier order (see `fetch_imagenet_class_names`).
        calibration_pixels (`torch.Tensor` of shape `(batch_size, 3, 224, 224)`): training images for the scale.
        threshold (`float`, *optional*, defaults to 4.0): logit offset of `linear_1`.

    Returns:
        `list[str]`: the class names behind the hidden units, in hidden-unit order.
    """
    projector, tower = model.model.multi_modal_projector, model.model.vision_tower
    hidden = projector.linear_1.out_features
    token_ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in class_names]
    candidates = [c for c in range(len(class_names)) if c not in IMAGENET_DOG_CLASSES]
    classes = sorted(sorted(candidates, key=lambda c: (len(token_ids[c]), c))[:hidden])
    embeddings = model.get_input_embeddings().weight
    class_embeddings = torch.stack([embeddings[token_ids[c]].mean(0) for c in classes])  # (hidden, text_hidden)

    projector.linear_1.weight.copy_(tower.fc.weight[classes])
    projector.linear_1.bias.copy_(tower.fc.bias[classes] - threshold)
    projector.linear_2.weight.copy_(class_embeddings.T)
    projector.linear_2.bias.zero_()
    projected = projector(tower(calibration_pixels).last_hidden_state)
    projector.linear_2.weight.mul_(embeddings.norm(dim=-1).median() / projected.norm(dim=-1).median())
    return [class_names[c] for c in classes]


def _learning_rate(base: float, step: int, steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `base`."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_projector(config: ProjectorTrainingConfig, command: str | None = None) -> Path:
    """Trains the projector and writes `projector.safetensors` (fp32) and `projector_provenance.json`.

    Args:
        config ([`ProjectorTrainingConfig`]): hyper-parameters and paths.
        command (`str`, *optional*): the command line to record (defaults to `sys.argv`).

    Returns:
        `Path`: the written `projector.safetensors`.
    """
    started = time.time()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    mixture = CaptionMixture(data_dir, seed=config.seed)
    model, processor = compose_pocket_vlm(dtype=torch.float32, random_projector=True)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    samples = {}
    if config.sample_max_new_tokens:
        samples["random_projector"] = describe_photos(
            model, processor, config.sample_photos, config.sample_max_new_tokens
        )

    train_started = time.time()
    if config.imagenet_init:
        calibration = [mixture[CALIBRATION_INDEX_OFFSET + i][0] for i in range(32)]
        pixels = processor.image_processor(calibration, return_tensors="pt")["pixel_values"]
        names = fetch_imagenet_class_names(data_dir)
        imagenet_projector_init(model, processor.tokenizer, names, pixels, config.init_threshold)
        if config.sample_max_new_tokens:
            samples["imagenet_init"] = describe_photos(
                model, processor, config.sample_photos, config.sample_max_new_tokens
            )
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.learning_rate, weight_decay=0.0)
    rng = random.Random(config.seed)
    losses, sources, step, prefix = [], {}, 0, None
    progress = tqdm(range(config.steps), desc="projector", dynamic_ncols=True)
    for step in progress:
        examples = [mixture[step * config.batch_size + i] for i in range(config.batch_size)]
        for _, _, source in examples:
            sources[source] = sources.get(source, 0) + 1
        batch = collate(processor, [(image, caption) for image, caption, _ in examples], rng)
        if prefix is None:
            first_ids = batch["input_ids"][0]
            prefix = SharedPrefix.compute(
                model, first_ids[: int(first_ids.eq(model.config.image_token_id).nonzero()[0])]
            )
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config.learning_rate, step, config.steps, config.warmup_steps)
        loss = caption_loss(model, batch, prefix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if config.max_minutes is not None and time.time() - train_started > 60 * config.max_minutes:
            break
    steps_done = step + 1
    train_seconds = time.time() - train_started

    if config.sample_max_new_tokens:
        samples["trained"] = describe_photos(model, processor, config.sample_photos, config.sample_max_new_tokens)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().float().contiguous() for name, tensor in projector.state_dict().items()}
    path = output_dir / PROJECTOR_FILE
    save_file(
        state, path, metadata={"format": "pt", "model": "specvlm-hf pocket VLM projector", "seed": str(config.seed)}
    )
    window = losses[-20:]
    provenance = {
        "command": command if command is not None else " ".join(sys.argv),
        "config": asdict(config),
        "seed": config.seed,
        "steps": steps_done,
        "stopped_early": steps_done < config.steps,
        "examples_seen": steps_done * config.batch_size,
        "examples_per_source": sources,
        "data_counts": mixture.counts,
        "data_sources": data_sources(),
        "held_out_photos": [spec.name for spec in BENCH_PHOTOS],
        "initial_loss": round(sum(losses[:10]) / len(losses[:10]), 4),
        "final_loss": round(sum(window) / len(window), 4),
        "loss_every_10_steps": [
            round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)
        ],
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "samples": {"prompt": SAMPLE_PROMPT, "max_new_tokens": config.sample_max_new_tokens, **samples},
        "package_versions": package_versions(),
    }
    (output_dir / PROJECTOR_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return path


__all__ = [
    "ProjectorTrainingConfig",
    "SharedPrefix",
    "caption_loss",
    "collate",
    "describe_photos",
    "imagenet_projector_init",
    "train_projector",
]
