# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""
`specvlm train`: train a SpecVLM draft for a target model with online-logit distillation (SpecVLM §3.5).

The same script runs as `python examples/train_draft.py ...` and as `python -m specvlm_hf.training.cli ...`.

Smoke run on a tiny random Llava target with synthetic data (seconds on a CPU, nothing downloaded):

    specvlm train --tiny llava --output_dir /tmp/tiny-draft --max_steps 4

Real target, LLaVA-format data (`{"images": [...], "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`):

    specvlm train \
        --target llava-hf/llava-1.5-7b-hf \
        --data llava_v1_5_mix665k.json --eval_data val.jsonl \
        --output_dir llava-1.5-7b-specvlm-draft \
        --bf16 --per_device_train_batch_size 4 --gradient_accumulation_steps 32 --num_train_epochs 1 \
        --do_eval --eval_strategy steps --eval_steps 1000 \
        --push_to_hub --hub_model_id <you>/llava-1.5-7b-specvlm-draft

Add `--regenerate_answers --prompt_suffix "Please answer in detail."` to first rewrite the answers with the target
itself (ViSpec §4.3; resumable), and `--draft_vocab_size 8192` for an EAGLE-3-style reduced draft head.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import HfArgumentParser

from ..models import SpecVLMDraftModel
from .config import OnlineDistillationConfig
from .data import DistillationDataset
from .self_distill import regenerate_answers
from .trainer import OnlineDistillationTrainer
from .vocab import build_draft_vocab

logger = logging.getLogger(__name__)

__all__ = ["ScriptArguments", "main", "make_parser", "train"]

_TINY_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


@dataclass
class ScriptArguments:
    """What to train on; every `OnlineDistillationConfig` / `TrainingArguments` flag is accepted as well."""

    target: str | None = field(default=None, metadata={"help": "Target model: Hub id or local path."})
    data: str | None = field(default=None, metadata={"help": "Training data: LLaVA-format .json or .jsonl file."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data in the same format."})
    tiny: str | None = field(
        default=None,
        metadata={"help": "Run on a tiny random target with synthetic data instead.", "choices": ["llava"]},
    )
    tiny_records: int = field(default=32, metadata={"help": "Synthetic records in --tiny mode."})
    target_dtype: str = field(default="auto", metadata={"help": "Target dtype: auto, bfloat16, float16 or float32."})
    num_draft_layers: int = field(default=1, metadata={"help": "Decoder layers of the draft (SpecVLM: 1)."})
    target_layer_ids: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated target hidden-state indices the draft reads (default: -1; EAGLE-3: e.g. 2,16,29)."
        },
    )
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Reduced draft vocabulary size (EAGLE-3); default: the full target vocabulary."},
    )
    regenerate_answers: bool = field(
        default=False, metadata={"help": "First regenerate the training answers with the target (ViSpec §4.3)."}
    )
    prompt_suffix: str | None = field(
        default=None, metadata={"help": "Suffix for user turns when regenerating, e.g. 'Please answer in detail.'."}
    )
    regenerate_max_new_tokens: int = field(default=512, metadata={"help": "Longest regenerated answer."})


def make_parser() -> HfArgumentParser:
    """The command-line parser: [`ScriptArguments`] and [`OnlineDistillationConfig`]."""
    return HfArgumentParser((ScriptArguments, OnlineDistillationConfig))


def _tiny_setup(script_args: ScriptArguments, seed: int):
    """A tiny random Llava target, its processor, and synthetic colour-naming conversations (in-memory images)."""
    from ..testing import build_tiny_target
    from ..testing.tiny_processors import build_tiny_processor

    target = build_tiny_target(script_args.tiny, seed=seed)
    processor = build_tiny_processor(script_args.tiny)
    rng = random.Random(seed)
    questions = ["what color is the image ?", "describe the picture .", "which color is there ?"]
    records = []
    for _ in range(script_args.tiny_records):
        color = rng.choice(sorted(_TINY_COLORS))
        records.append(
            {
                "images": [Image.new("RGB", (32, 32), _TINY_COLORS[color])],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + rng.choice(questions)},
                    {"from": "gpt", "value": f"the image is {color} . it shows a {color} sky ."},
                ],
            }
        )
    split = max(1, len(records) // 8)
    return target, processor, records[split:], records[:split]


def _load_target(script_args: ScriptArguments):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    dtype = (
        script_args.target_dtype if script_args.target_dtype == "auto" else getattr(torch, script_args.target_dtype)
    )
    config = AutoConfig.from_pretrained(script_args.target)
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        target = AutoModelForImageTextToText.from_pretrained(script_args.target, dtype=dtype)
        processor = AutoProcessor.from_pretrained(script_args.target)
    else:
        target = AutoModelForCausalLM.from_pretrained(script_args.target, dtype=dtype)
        processor = AutoTokenizer.from_pretrained(script_args.target)
    return target, processor


def train(script_args: ScriptArguments, config: OnlineDistillationConfig) -> OnlineDistillationTrainer:
    """
    Builds the target, data and draft, trains, saves the draft (and evaluates / pushes it when `config` asks).

    Returns:
        [`OnlineDistillationTrainer`]: the trainer, with the trained draft as `trainer.model`.
    """
    # ------------------------------------------------------------------ target and data
    if script_args.tiny:
        target, processor, train_data, eval_data = _tiny_setup(script_args, config.seed)
    elif script_args.target and script_args.data:
        target, processor = _load_target(script_args)
        train_data, eval_data = script_args.data, script_args.eval_data
    else:
        raise ValueError("pass --tiny llava, or both --target and --data")

    if script_args.regenerate_answers:
        regenerated = os.path.join(config.output_dir, "self_distilled.jsonl")
        counts = regenerate_answers(
            target,
            processor,
            train_data,
            regenerated,
            prompt_suffix=script_args.prompt_suffix,
            max_new_tokens=script_args.regenerate_max_new_tokens,
            show_progress=not config.disable_tqdm,
        )
        logger.info("Regenerated answers: %s", dict(counts))
        train_data = regenerated

    train_dataset = DistillationDataset(
        train_data,
        processor,
        max_length=config.max_length,
        assistant_only_loss=config.assistant_only_loss,
        show_progress=not config.disable_tqdm,
    )
    eval_dataset = (
        DistillationDataset(
            eval_data,
            processor,
            max_length=config.max_length,
            assistant_only_loss=config.assistant_only_loss,
            show_progress=not config.disable_tqdm,
        )
        if eval_data is not None
        else None
    )

    # ------------------------------------------------------------------ draft
    overrides = {"num_hidden_layers": script_args.num_draft_layers}
    if script_args.target_layer_ids:
        overrides["target_layer_ids"] = [int(i) for i in script_args.target_layer_ids.split(",")]
    # float32 master weights whatever the target's dtype (use --bf16 for mixed precision); cast the trained draft to
    # the target's dtype for decoding, as the model card's quick start does
    draft = SpecVLMDraftModel.from_target(target, **overrides).float()
    if script_args.draft_vocab_size:
        build_draft_vocab(draft, target, train_dataset, script_args.draft_vocab_size)

    # ------------------------------------------------------------------ training
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if config.do_eval and eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        trainer.create_model_card()
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=os.path.basename(script_args.data) if script_args.data else None)
    return trainer


def main(argv: list[str] | None = None) -> int:
    """`specvlm train`: parses `argv` (default: `sys.argv[1:]`) and runs [`train`]; returns the exit status."""
    parser = make_parser()
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    if not (script_args.tiny or (script_args.target and script_args.data)):
        parser.error("pass --tiny llava, or both --target and --data")
    logging.basicConfig(level=logging.INFO if config.should_log else logging.WARNING)
    train(script_args, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
