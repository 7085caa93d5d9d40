"""Trains the pocket VLM's shipped SpecVLM draft: self-distilled data, online-logit distillation, provenance.

The recipe, end to end on a CPU (`specvlm pocket train-draft`):

1. [`build_prompt_records`]: training prompts disjoint from the benchmark prompts: images from the projector's
   [`CaptionMixture`] stream under another seed (emoji, training photos, rendered text, shapes; never a
   [`BENCH_PHOTOS`] photo), some two-image comparisons, and text-only instructions built from ImageNet class names.
2. [`self_distill_batched`]: the target answers every prompt greedily (left-padded batches; resumable JSONL in the
   LLaVA format), so the draft learns the distribution it will have to predict (ViSpec §4.3).
3. [`train_pocket_draft`]: `SpecVLMDraftModel.from_target(target)` with a reduced EAGLE-3 vocabulary built from the
   training answers, trained by [`OnlineDistillationTrainer`] against the live target, evaluated after every epoch
   (distillation metrics and the real mean acceptance length of tree decoding on a held-out split), saved in bf16
   with a provenance record into `assets/pocket/draft/`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .build import cache_root, package_versions
from .draft import DRAFT_DIR

logger = logging.getLogger(__name__)

DRAFT_PROVENANCE_FILE = "draft_provenance.json"
POCKET_TARGET_NAME = "specvlm-hf pocket VLM (local build: specvlm pocket build)"
IMAGE_INSTRUCTIONS = (
    "Describe the image.",
    "Describe the image in detail.",
    "What is in this image?",
    "What do you see in this picture?",
    "What does this image show? Describe it.",
    "Describe this picture.",
    "What is happening in this image?",
    "Tell me about this image.",
    "Write a caption for this picture and explain it.",
    "What can you see here? Give some details.",
)
COMPARE_INSTRUCTIONS = (
    "Compare the two images.",
    "What is the difference between these two pictures?",
    "Describe both images.",
    "How are these two images alike and how do they differ?",
)
TEXT_TEMPLATES = (
    "Explain what a {} is.",
    "Write a short poem about a {}.",
    "Tell me a short story about a {}.",
    "Describe a {} in a few sentences.",
    "Give me three facts about the {}.",
    "Why do people find the {} interesting?",
    "Write a short paragraph about a {}.",
    "Explain in a few sentences how a {} works or lives.",
)


@dataclass
class PocketDraftRecipe:
    """Every knob of the shipped draft's recipe (saved in its provenance record)."""

    seed: int = 1
    image_records: int = 260
    compare_records: int = 24
    text_records: int = 180
    eval_records: int = 24
    max_new_tokens: int = 128
    generation_batch_size: int = 24
    draft_vocab_size: int = 8192
    epochs: int = 4
    learning_rate: float = 5e-4
    batch_size: int = 4
    warmup_ratio: float = 0.03
    feature_noise: float = 0.1
    eval_acceptance_prompts: int = 12
    eval_acceptance_max_new_tokens: int = 96
    stream_seed: int = 7  # CaptionMixture seed (the projector used 0)
    teacher_dtype: str = "float32"  # fp32 is faster than emulated bf16 for long sequences on CPUs without AVX512-BF16
    extra: dict[str, Any] = field(default_factory=dict)


def default_work_dir() -> Path:
    """Cache folder of the draft recipe's data and checkpoints (`~/.cache/specvlm_hf/pocket-draft`)."""
    return cache_root() / "pocket-draft"


def build_prompt_records(recipe: PocketDraftRecipe, work_dir: str | Path) -> list[dict[str, Any]]:
    """
    Writes the training images as PNG files under `work_dir/images/` and returns prompt-only LLaVA records.

    Records are `{"id", "images": [relative paths], "conversations": [{"from": "human", "value": ...}]}`; ids are
    stable for a given recipe, so a resumed self-distillation skips what it already answered.

    Returns:
        `list[dict]`: image records, then two-image records, then text-only records, shuffled with `recipe.seed`.
    """
    from .data import CaptionMixture, check_disjoint, default_data_dir, fetch_emoji, fetch_imagenet_class_names

    check_disjoint()
    work_dir = Path(work_dir)
    image_dir = work_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    data_dir = default_data_dir()
    fetch_emoji(data_dir)
    stream = CaptionMixture(data_dir, seed=recipe.stream_seed)
    rng = random.Random(recipe.seed)

    def image(index: int) -> str:
        name = f"s{recipe.stream_seed}_{index:06d}.png"
        if not (image_dir / name).is_file():
            stream[index][0].save(image_dir / name)
        return f"images/{name}"

    records: list[dict[str, Any]] = []
    next_index = 0
    for number in range(recipe.image_records):
        question = rng.choice(IMAGE_INSTRUCTIONS)
        records.append(_record(f"img{number}", [image(next_index)], f"<image>\n{question}"))
        next_index += 1
    for number in range(recipe.compare_records):
        question = rng.choice(COMPARE_INSTRUCTIONS)
        paths = [image(next_index), image(next_index + 1)]
        records.append(_record(f"cmp{number}", paths, f"<image>\n<image>\n{question}"))
        next_index += 2
    names = fetch_imagenet_class_names(data_dir)
    for number in range(recipe.text_records):
        question = rng.choice(TEXT_TEMPLATES).format(rng.choice(names))
        records.append(_record(f"txt{number}", [], question))
    rng.shuffle(records)
    return records


def _record(key: str, images: list[str], question: str) -> dict[str, Any]:
    return {"id": key, "images": images, "conversations": [{"from": "human", "value": question}]}


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    question = record["conversations"][0]["value"]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in record["images"]]
    content.append({"type": "text", "text": question.replace("<image>\n", "").strip()})
    return [{"role": "user", "content": content}]


@torch.no_grad()
def self_distill_batched(
    target: torch.nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    output_path: str | Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    show_progress: bool = True,
) -> int:
    """
    Answers single-turn prompt records with the target (greedy, left-padded batches of records with the same number
    of images) and appends them to `output_path` as LLaVA records; records already there are skipped (resumable).

    Image paths in `records` are relative to `output_path`'s folder. Empty answers are skipped and counted.

    Returns:
        `int`: number of records written by this call.
    """
    from PIL import Image

    output_path = Path(output_path)
    root = output_path.parent
    done = set()
    if output_path.is_file():
        done = {json.loads(line)["id"] for line in output_path.read_text().splitlines() if line.strip()}
    pending = [record for record in records if record["id"] not in done]
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in pending:
        groups.setdefault(len(record["images"]), []).append(record)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    parameter = next(target.parameters())
    written = empty = 0
    with open(output_path, "a", encoding="utf-8") as handle:
        for batch in tqdm(batches, desc="Self-distilling answers", disable=not show_progress):
            texts = [processor.apply_chat_template(_messages(r), add_generation_prompt=True) for r in batch]
            images = [Image.open(root / path).convert("RGB") for r in batch for path in r["images"]]
            if images:
                inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
            else:
                inputs = tokenizer(texts, return_tensors="pt", padding=True)
            inputs = {
                k: (v.to(parameter.device, parameter.dtype) if torch.is_floating_point(v) else v.to(parameter.device))
                for k, v in inputs.items()
            }
            out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for record, answer in zip(batch, answers, strict=True):
                if not answer.strip():
                    empty += 1
                    continue
                conversation = record["conversations"] + [{"from": "gpt", "value": answer.strip()}]
                handle.write(json.dumps({**record, "conversations": conversation}, ensure_ascii=False) + "\n")
                written += 1
            handle.flush()
    if empty:
        logger.warning("Self-distillation: %d empty answers skipped.", empty)
    return written


def split_records(path: str | Path, eval_records: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Loads the self-distilled JSONL (image paths made absolute) and splits off the last `eval_records` records."""
    from ..training.data import load_llava_records

    records = load_llava_records(path)
    if len(records) <= eval_records:
        raise ValueError(f"{path} has {len(records)} records; need more than eval_records={eval_records}")
    return records[:-eval_records], records[-eval_records:]


def epoch_acceptance(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-evaluation rows of a Trainer `log_history`: epoch, mean acceptance length, eval loss terms."""
    rows = []
    for entry in log_history:
        if "eval_mean_accept_len" in entry:
            rows.append({key: value for key, value in entry.items() if key.startswith("eval_") or key == "epoch"})
    return rows


def plot_acceptance_curve(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Plots mean acceptance length (bonus token included) against training epochs and saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row.get("epoch", 0.0) for row in rows]
    accept = [row["eval_mean_accept_len"] for row in rows]
    figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    axis.plot(epochs, accept, marker="o")
    for x, y in zip(epochs, accept, strict=True):
        axis.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axis.set_xlabel("training epoch")
    axis.set_ylabel("mean acceptance length (incl. bonus)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


class _EpochTimer(TrainerCallback):
    """Records the wall time of every training epoch, evaluation excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def train_pocket_draft(
    recipe: PocketDraftRecipe | None = None,
    work_dir: str | Path | None = None,
    output_dir: str | Path = DRAFT_DIR,
    command: str | None = None,
    num_threads: int | None = None,
) -> Path:
    """
    Runs the whole recipe (data → self-distillation → training with per-epoch evaluation) and writes the shipped
    draft (bf16 safetensors, config, model card), `draft_provenance.json` and `acceptance_by_epoch.png` into
    `output_dir`.

    Returns:
        `Path`: `output_dir`.
    """
    from ..models import SpecVLMDraftModel
    from ..training import OnlineDistillationConfig, OnlineDistillationTrainer, build_draft_vocab
    from ..training.data import DistillationDataset
    from .build import load_pocket_vlm

    recipe = recipe or PocketDraftRecipe()
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    output_dir = Path(output_dir)
    if num_threads:
        torch.set_num_threads(num_threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    target, processor = load_pocket_vlm(dtype=getattr(torch, recipe.teacher_dtype))

    started = time.perf_counter()
    records = build_prompt_records(recipe, work_dir)
    data_path = work_dir / "train.jsonl"
    self_distill_batched(
        target,
        processor,
        records,
        data_path,
        max_new_tokens=recipe.max_new_tokens,
        batch_size=recipe.generation_batch_size,
    )
    data_seconds = time.perf_counter() - started
    train_rows, eval_rows = split_records(data_path, recipe.eval_records)

    torch.manual_seed(recipe.seed)
    draft = SpecVLMDraftModel.from_target(target).float()  # fp32 master weights; the teacher stays bf16
    args = OnlineDistillationConfig(
        output_dir=str(work_dir / "trainer"),
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="cosine",
        feature_noise=recipe.feature_noise,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=10,
        eval_acceptance_prompts=recipe.eval_acceptance_prompts,
        eval_acceptance_max_new_tokens=recipe.eval_acceptance_max_new_tokens,
        report_to=[],
        seed=recipe.seed,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    train_set = DistillationDataset(train_rows, processor, max_length=args.max_length)
    eval_set = DistillationDataset(eval_rows, processor, max_length=args.max_length)
    vocab = build_draft_vocab(draft, target, train_set, recipe.draft_vocab_size)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=processor,
    )
    before = trainer.evaluate()  # the untrained draft (epoch 0)
    timer = _EpochTimer()
    trainer.add_callback(timer)
    trainer.train()
    rows = [{**before, "epoch": 0.0}] + epoch_acceptance(trainer.state.log_history)

    output_dir.mkdir(parents=True, exist_ok=True)
    draft = trainer.accelerator.unwrap_model(trainer.model).to(torch.bfloat16)
    draft.config.target_model_name_or_path = POCKET_TARGET_NAME  # not this machine's cache path
    draft.save_pretrained(output_dir)
    for code in output_dir.glob("*.py"):  # remote-code copies: the package itself provides the classes
        code.unlink()
    plot_acceptance_curve(
        rows, output_dir / "acceptance_by_epoch.png",
        f"pocket VLM draft, {len(train_rows)} self-distilled records, CPU",
    )
    provenance = {
        "command": command or "specvlm pocket train-draft",
        "recipe": asdict(recipe),
        "data": {
            "train_records": len(train_rows),
            "eval_records": len(eval_rows),
            "sources": "CaptionMixture(seed=stream_seed) images (emoji, training photos, rendered text, shapes; "
            "disjoint from the benchmark photos, checked), two-image comparisons, text instructions over ImageNet "
            "class names; answers generated greedily by the pocket VLM itself",
            "data_seconds": data_seconds,
        },
        "draft_vocab_size": int(vocab.numel()),
        "epoch_seconds": timer.seconds,
        "evaluations": rows,
        "torch_threads": torch.get_num_threads(),
        "package_versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (output_dir / DRAFT_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    write_draft_card(draft, output_dir, provenance)
    return output_dir


def write_draft_card(
    draft: Any, output_dir: str | Path, provenance: dict[str, Any], speedup: float | None = None,
    speedup_setup: str | None = None,
) -> str:
    """Writes the shipped draft's model card (`README.md`) from its provenance record (and a measured speedup)."""
    recipe, rows = provenance["recipe"], provenance["evaluations"]
    config = draft.config
    lines = [
        "---",
        "library_name: specvlm-hf",
        "tags: [specvlm-hf, speculative-decoding, eagle, vision-language]",
        "---",
        "",
        "# pocket VLM SpecVLM draft",
        "",
        "The trained [SpecVLM](https://arxiv.org/abs/2509.11815) (EagleVLM) draft of the offline pocket VLM",
        "(SmolLM2-135M-Instruct + EfficientNet-Lite0 as LLaVA, built by `specvlm pocket build`). Reproduce it with",
        f"`{provenance['command']}`; every number below comes from `{DRAFT_PROVENANCE_FILE}`.",
        "",
        "```python",
        "from specvlm_hf.pocket import demo_inputs, load_pocket_draft, load_pocket_vlm",
        "",
        "target, processor = load_pocket_vlm()",
        "draft = load_pocket_draft(target)",
        "out = target.generate(**demo_inputs(processor), assistant_model=draft, max_new_tokens=96)  # same tokens",
        "```",
        "",
        f"- Architecture: `[embedding(x_{{t+1}}); feature(x_t)]` -> fc -> RMSNorm -> {config.num_hidden_layers} Llama "
        f"decoder layer, reduced head of {config.draft_vocab_size} tokens, {draft.num_parameters():,} parameters.",
        f"- Default tree: top-k {config.tree_top_k}, depth {config.tree_depth}, {config.tree_total_tokens} nodes "
        "(`specvlm bench` calibrates it per device).",
        f"- Data: {provenance['data']['train_records']} self-distilled records (answers generated by the pocket VLM "
        f"itself), {provenance['data']['eval_records']} held out; images disjoint from the benchmark photos.",
        f"- Training: online-logit distillation, {recipe['epochs']} epochs, batch {recipe['batch_size']}, "
        f"lr {recipe['learning_rate']}, feature noise {recipe['feature_noise']}, seed {recipe['seed']}.",
        "",
        "| Epoch | " + " | ".join(f"{row['epoch']:g}" for row in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| Mean acceptance length (incl. bonus), held out | "
        + " | ".join(f"{row['eval_mean_accept_len']:.2f}" for row in rows) + " |",
        "",
    ]
    if speedup is not None:
        lines += [f"Measured end-to-end speedup over plain decoding: **{speedup:.2f}×** ({speedup_setup}).", ""]
    text = "\n".join(lines)
    (Path(output_dir) / "README.md").write_text(text)
    return text
