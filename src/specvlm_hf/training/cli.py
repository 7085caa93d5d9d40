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
itself (ViSpec §4.3), and `--draft_vocab_size 8192` for an EAGLE-3-style reduced draft head. Regenerated data goes to
`<output_dir>/self_distilled-<key>.jsonl`, one file per input (data file, target and generation settings), so an
interrupted regeneration resumes and another `--data` never mixes into it.

Large data: `--streaming --max_steps N` reads `--data` as a stream (records encoded as they are read, memory flat,
bad records skipped and counted with their file:line when met, no validation pass). EAGLE-3's training-time test:
`--ttt_steps 7` (`--ttt_decay 0.8`), with `--target_layer_ids 2,16,29` for its low/middle/high feature taps.

Resuming and rerunning: `--resume_from_checkpoint` (alone, or `True`) resumes from the latest `checkpoint-*` folder of
`--output_dir` (saved with `--save_strategy steps|epoch`), `--resume_from_checkpoint <path>` from that checkpoint. An
`--output_dir` that already holds a trained draft or checkpoints is refused unless one of `--resume_from_checkpoint` or
`--overwrite_output_dir` (train from scratch, replacing them) says what to do with it.

Bad flags, paths and flag combinations raise [`~specvlm_hf.errors.UserError`]s, checked before the target is loaded;
`specvlm train` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import HfArgumentParser

from ..errors import UserError, UserFileNotFoundError, UserValueError
from ..models import SpecVLMDraftModel
from .config import OnlineDistillationConfig
from .data import DistillationDataset
from .self_distill import regenerate_answers, regeneration_fingerprint
from .streaming import StreamingDistillationDataset
from .trainer import OnlineDistillationTrainer
from .vocab import build_draft_vocab

logger = logging.getLogger(__name__)

__all__ = [
    "ScriptArguments",
    "check_arguments",
    "check_output_dir",
    "main",
    "make_parser",
    "resolve_checkpoint",
    "train",
]

_TINY_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
_TARGET_DTYPES = ("auto", "bfloat16", "float16", "float32")
#: Files of a trained draft in an output folder (what a rerun would overwrite).
_TRAINED_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_YES, _NO = {"true", "yes", "1"}, {"false", "no", "0", ""}


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
    target_dtype: str = field(
        default="auto",
        metadata={"help": "Target dtype: auto, bfloat16, float16 or float32.", "choices": list(_TARGET_DTYPES)},
    )
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


class _Parser(HfArgumentParser):
    """Reports a bad flag (unknown, invalid choice, missing value) as a one-line [`UserValueError`]."""

    def error(self, message: str):
        raise UserValueError(f"{message} (see `specvlm train --help`)")


def make_parser() -> HfArgumentParser:
    """The command-line parser: [`ScriptArguments`] and [`OnlineDistillationConfig`]."""
    return _Parser((ScriptArguments, OnlineDistillationConfig), prog="specvlm train")


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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _layer_ids(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise UserValueError(
            f"--target_layer_ids {text!r}: expected comma-separated integers, e.g. 2,16,29 or -1"
        ) from error


def _check_data_path(flag: str, path: str) -> None:
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserValueError(f"{flag} {path} is a folder; pass a LLaVA-format .json or .jsonl file")


def _check_target_path(target: str) -> None:
    """A missing local folder is named as such (not as a malformed Hub repo id)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = os.path.expanduser(target)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise UserValueError(f"--target {target} is a file; pass the target's model folder or a Hub repo id")
    try:
        validate_repo_id(target)
    except HFValidationError as error:
        raise UserFileNotFoundError(
            f"--target {target}: the local folder does not exist (and it is not a Hub repo id either)"
        ) from error


def _checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """
    The checkpoint `--resume_from_checkpoint` asks for, as transformers documents the flag.

    Args:
        value (`str`, `bool` or `None`): the flag's value: `None`/`False` (do not resume), `True` (the flag alone; the
            latest `checkpoint-*` folder of `output_dir`) or a checkpoint folder.
        output_dir (`str`): the run's output folder.

    Returns:
        `str` or `None`: the checkpoint folder to resume from.

    Raises:
        [`~specvlm_hf.errors.UserFileNotFoundError`] when there is no checkpoint to resume from,
        [`~specvlm_hf.errors.UserValueError`] when the folder given is not a Trainer checkpoint.
    """
    if value is None or str(value).strip().lower() in _NO:
        return None
    if str(value).strip().lower() in _YES:
        checkpoints = _checkpoints(output_dir)
        if not checkpoints:
            raise UserFileNotFoundError(
                f"--resume_from_checkpoint: no checkpoint-* folder in {output_dir} to resume from (checkpoints are "
                "written during training with --save_strategy steps or epoch; a final model.safetensors is not one). "
                "Pass a checkpoint folder, or drop the flag to start over (with --overwrite_output_dir if "
                f"{output_dir} holds a trained draft)."
            )
        return checkpoints[-1]
    path = os.path.expanduser(str(value))
    if not os.path.isdir(path):
        raise UserFileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise UserValueError(
            f"--resume_from_checkpoint {value} is not a Trainer checkpoint (no trainer_state.json): pass one of the "
            "checkpoint-* folders, or the flag alone for the latest one in --output_dir"
        )
    return path


def check_output_dir(output_dir: str, *, resuming: bool, overwrite: bool) -> None:
    """
    Refuses to train from scratch into an `output_dir` that holds a trained draft or checkpoints, unless `overwrite`.

    Raises:
        [`~specvlm_hf.errors.UserValueError`] explaining `--resume_from_checkpoint` and `--overwrite_output_dir`.
    """
    if resuming and overwrite:
        raise UserValueError(
            "--resume_from_checkpoint and --overwrite_output_dir contradict each other: resume the run, or start over"
        )
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    trained = [name for name in _TRAINED_FILES if os.path.isfile(os.path.join(output_dir, name))]
    checkpoints = _checkpoints(output_dir)
    if not trained and not checkpoints:
        return
    held = ([f"a trained draft ({trained[0]})"] if trained else []) + (
        [f"{len(checkpoints)} checkpoint(s), the latest {os.path.basename(checkpoints[-1])}"] if checkpoints else []
    )
    resume = (
        "--resume_from_checkpoint to continue from the latest checkpoint (or --resume_from_checkpoint <folder>)"
        if checkpoints
        else "--resume_from_checkpoint to continue a run (this folder has no checkpoint-* folder to resume from: "
        "save them with --save_strategy steps or epoch)"
    )
    raise UserValueError(
        f"--output_dir {output_dir} already holds {' and '.join(held)}; training again would overwrite it. Pass "
        f"{resume}, or --overwrite_output_dir to train from scratch and replace it (or choose another --output_dir)."
    )


def check_arguments(script_args: ScriptArguments, config: OnlineDistillationConfig) -> str | None:
    """
    Checks the flags, their combinations and the paths they name before anything is loaded.

    Returns:
        `str` or `None`: the checkpoint to resume from (see [`resolve_checkpoint`]).

    Raises:
        [`~specvlm_hf.errors.UserError`] naming the flag and what to do.
    """
    if script_args.tiny and (script_args.target or script_args.data or script_args.eval_data):
        raise UserValueError("--tiny makes its own target and data: drop --target, --data and --eval_data")
    if not script_args.tiny and not (script_args.target and script_args.data):
        raise UserValueError("pass --tiny llava, or both --target and --data")
    if script_args.data:
        _check_data_path("--data", script_args.data)
    if script_args.eval_data:
        _check_data_path("--eval_data", script_args.eval_data)
    if config.do_eval and not (script_args.eval_data or script_args.tiny):
        raise UserValueError("--do_eval (or an --eval_strategy other than no) needs --eval_data")
    if script_args.prompt_suffix and not script_args.regenerate_answers:
        raise UserValueError("--prompt_suffix is only used with --regenerate_answers")
    for flag, value in (
        ("--num_draft_layers", script_args.num_draft_layers),
        ("--regenerate_max_new_tokens", script_args.regenerate_max_new_tokens),
        ("--tiny_records", script_args.tiny_records),
    ):
        if value < 1:
            raise UserValueError(f"{flag} must be >= 1, got {value}")
    if script_args.draft_vocab_size is not None and script_args.draft_vocab_size < 1:
        raise UserValueError(f"--draft_vocab_size must be >= 1, got {script_args.draft_vocab_size}")
    _layer_ids(script_args.target_layer_ids)
    if script_args.target:
        _check_target_path(script_args.target)
    resume = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    check_output_dir(config.output_dir, resuming=resume is not None, overwrite=config.overwrite_output_dir)
    return resume


def _remove_stale_checkpoints(config: OnlineDistillationConfig) -> None:
    """`--overwrite_output_dir`: the previous run's checkpoints would be taken for this run's (resume, rotation)."""
    if not (config.overwrite_output_dir and config.should_save):
        return
    for checkpoint in _checkpoints(config.output_dir):
        logger.warning("--overwrite_output_dir: deleting %s of the previous run", checkpoint)
        shutil.rmtree(checkpoint)


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
    try:
        config = AutoConfig.from_pretrained(script_args.target)
        if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            target = AutoModelForImageTextToText.from_pretrained(script_args.target, dtype=dtype)
            processor = AutoProcessor.from_pretrained(script_args.target)
        else:
            target = AutoModelForCausalLM.from_pretrained(script_args.target, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(script_args.target)
    except OSError as error:  # not a model folder, not on the Hub, offline without a cached copy, ...
        raise UserValueError(f"--target {script_args.target}: cannot load it: {_one_line(error)}") from error
    return target, processor


def train(script_args: ScriptArguments, config: OnlineDistillationConfig) -> OnlineDistillationTrainer:
    """
    Checks the arguments ([`check_arguments`]), builds the target, data and draft, trains, saves the draft (and
    evaluates / pushes it when `config` asks).

    Returns:
        [`OnlineDistillationTrainer`]: the trainer, with the trained draft as `trainer.model`.

    Raises:
        [`~specvlm_hf.errors.UserError`] for bad flags, paths or data.
    """
    resume = check_arguments(script_args, config)
    # ------------------------------------------------------------------ target and data
    if script_args.tiny:
        target, processor, train_data, eval_data = _tiny_setup(script_args, config.seed)
    else:
        target, processor = _load_target(script_args)
        train_data, eval_data = script_args.data, script_args.eval_data

    if script_args.regenerate_answers:
        fingerprint = regeneration_fingerprint(
            target,
            processor,
            train_data,
            prompt_suffix=script_args.prompt_suffix,
            max_new_tokens=script_args.regenerate_max_new_tokens,
        )
        regenerated = os.path.join(config.output_dir, f"self_distilled-{fingerprint['key']}.jsonl")
        legacy = os.path.join(config.output_dir, "self_distilled.jsonl")
        if os.path.isfile(legacy):
            logger.warning("Ignoring %s (not keyed to its input); this input's answers go to %s", legacy, regenerated)
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

    if config.streaming:  # read as it trains: flat memory, bad records skipped when met
        train_dataset = StreamingDistillationDataset(
            train_data,
            processor,
            max_length=config.max_length,
            assistant_only_loss=config.assistant_only_loss,
            shuffle_buffer_size=config.streaming_shuffle_buffer_size,
            seed=config.data_seed if config.data_seed is not None else config.seed,
        )
    else:
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
    if script_args.draft_vocab_size and config.streaming:
        # the data-built head needs token counts over the whole data set, which a stream does not hold
        overrides["draft_vocab_size"] = script_args.draft_vocab_size
        logger.info(
            "--streaming: the %d-id draft head uses the data-free default vocabulary (build one from the data with "
            "specvlm_hf.build_draft_vocab over a DistillationDataset to do better)",
            script_args.draft_vocab_size,
        )
    if script_args.target_layer_ids:
        overrides["target_layer_ids"] = _layer_ids(script_args.target_layer_ids)
    # float32 master weights whatever the target's dtype (use --bf16 for mixed precision); cast the trained draft to
    # the target's dtype for decoding, as the model card's quick start does
    try:
        draft = SpecVLMDraftModel.from_target(target, **overrides).float()
    except ValueError as error:  # e.g. --target_layer_ids outside the target's layers
        if isinstance(error, UserError):
            raise
        raise UserValueError(f"cannot build a draft for this target with these flags: {_one_line(error)}") from error
    if script_args.draft_vocab_size and not config.streaming:
        try:
            build_draft_vocab(draft, target, train_dataset, script_args.draft_vocab_size)
        except ValueError as error:
            raise UserValueError(f"--draft_vocab_size {script_args.draft_vocab_size}: {_one_line(error)}") from error

    # ------------------------------------------------------------------ training
    trainer = OnlineDistillationTrainer(
        model=draft,
        teacher=target,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
    if resume is None:
        _remove_stale_checkpoints(config)
    trainer.train(resume_from_checkpoint=resume)
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
    """
    `specvlm train`: parses `argv` (default: `sys.argv[1:]`) and runs [`train`]; returns the exit status. Bad flags
    raise [`~specvlm_hf.errors.UserError`] (the `specvlm` command prints it as one line and exits with status 2).
    """
    parser = make_parser()
    try:
        script_args, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks of flag values and combinations
        if isinstance(error, UserError):
            raise
        raise UserValueError(f"invalid flags: {_one_line(error)}") from error
    logging.basicConfig(level=logging.INFO if config.should_log else logging.WARNING)
    trainer = train(script_args, config)
    finish_distributed(trainer)
    return 0


def finish_distributed(trainer: OnlineDistillationTrainer) -> None:
    """
    Ends a training run cleanly under `accelerate launch`: waits for every rank, drops the trainer's references to the
    DDP-wrapped model and optimizer (their gloo work objects must die while the process group is alive), then finishes
    the trackers and destroys the process group while Python is still whole. A gloo group or its pending work left to
    interpreter shutdown can abort a rank ("terminate called without an active exception").
    """
    import gc

    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    raise SystemExit(main())
