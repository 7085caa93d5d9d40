# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of [`OnlineDistillationTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import UserValueError

__all__ = ["OnlineDistillationConfig"]


@dataclass
class OnlineDistillationConfig(TrainingArguments):
    r"""
    Arguments of [`OnlineDistillationTrainer`]: SpecVLM's online-logit distillation of a draft against a live,
    frozen target (SpecVLM §3.5). Only the fields below are new; every [`~transformers.TrainingArguments`] field
    works as usual. All fields carry `help` metadata, so [`~transformers.HfArgumentParser`] exposes them as flags.

    Defaults follow SpecVLM (λ_logit 0.1, λ_feat 1.0, AdamW β2 0.95, no weight decay, no warmup, lr 8e-5 as for its
    7B targets; use 5e-5 for 13B targets). Invalid values raise [`~specvlm_hf.errors.UserValueError`] (a
    `ValueError`), which `specvlm train` prints as one line.

    Parameters:
        lambda_logit (`float`, *optional*, defaults to `0.1`):
            Weight of the soft cross-entropy between draft logits and the target's distribution (temperature 1).
        lambda_feat (`float`, *optional*, defaults to `1.0`):
            Weight of the SmoothL1 regression of the draft output onto the target's next feature (the LM-head input).
        feature_noise (`float`, *optional*, defaults to `0.0`):
            Width of the uniform noise `(U[0, 1) - 0.5) * feature_noise` added, during training only, to the target
            features the draft reads (not to the regression targets). EAGLE-1/2 and ViSpec use 0.2 (there also
            scaled by `512 / sequence_length`) because their features were dumped once and reused for 20 epochs;
            SpecVLM trains online for 1-5 epochs and states no noise, so it is off by default. Set 0.2 to reproduce
            EAGLE.
        max_length (`int` or `None`, *optional*, defaults to `2048`):
            Longest tokenised sample (image tokens included). Longer records are **skipped and counted** (reason
            `too_long`), never truncated: truncation would cut image placeholders. `None` keeps every length.
        assistant_only_loss (`bool`, *optional*, defaults to `True`):
            Train only on positions that predict assistant tokens (the tokens the draft proposes at inference).
            `False` trains on every text token (image placeholders are always excluded).
        ttt_steps (`int`, *optional*, defaults to `1`):
            Training-time test (EAGLE-3): how many steps the draft is unrolled on its own predictions. Step `i > 0`
            feeds the draft's own output of step `i - 1` in place of the target feature, with the token embeddings
            shifted one more position, attends to the context and to its own earlier steps exactly as a draft-tree
            node of depth `i` does (see `specvlm_hf.training.ttt`), and is trained against the target's data `i`
            positions further on. `1` is the EAGLE-1 recipe (one teacher-forced step; the loss is unchanged). EAGLE-3
            uses 7; each extra step costs about one more draft forward and backward. Not available with a visual
            compressor or with gradient checkpointing (it needs the draft's cache).
        ttt_decay (`float`, *optional*, defaults to `0.8`):
            Weight `ttt_decay ** i` of step `i`'s loss (EAGLE-3: 0.8); must lie in (0, 1]. Unused when `ttt_steps=1`.
        streaming (`bool`, *optional*, defaults to `False`):
            Read raw training data (`.json` / `.jsonl` paths, or a `datasets.IterableDataset`) as a stream
            ([`StreamingDistillationDataset`]): records are encoded as they are read, so memory stays flat for
            data sets of any size and training starts at once; bad records are skipped and counted with their
            `file:line` when met (there is no validation pass). A stream has no length: set `max_steps`. Evaluation
            data stays in memory.
        streaming_shuffle_buffer_size (`int`, *optional*, defaults to `1000`):
            With `streaming`, shuffle the stream through a buffer of this many records (reseeded every epoch;
            `0`: file order).
        eval_acceptance_prompts (`int`, *optional*, defaults to `8`):
            On `evaluate()`, how many held-out prompts (the first records of the evaluation dataset, cut before their
            first assistant turn) are decoded with `target.generate(..., assistant_model=draft)` to measure the real
            mean acceptance length. `0` disables the measurement.
        eval_acceptance_max_new_tokens (`int`, *optional*, defaults to `64`):
            `max_new_tokens` of those greedy generations.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Used by `specvlm train` (transformers 5 dropped this `TrainingArguments` field): train from scratch into
            an `output_dir` that already holds a trained draft or `checkpoint-*` folders, replacing them (the old
            checkpoints are deleted so they cannot be mistaken for this run's). Without it (and without
            `resume_from_checkpoint`) `specvlm train` refuses such a folder instead of overwriting it.
        resume_from_checkpoint (`str`, *optional*):
            Used by `specvlm train`, as in transformers' example scripts: `--resume_from_checkpoint` alone (or `True`)
            resumes from the latest `checkpoint-*` folder in `output_dir`; a path resumes from that checkpoint.
    """

    lambda_logit: float = field(
        default=0.1,
        metadata={"help": "Weight of the soft cross-entropy between draft logits and the target distribution (T=1)."},
    )
    lambda_feat: float = field(
        default=1.0,
        metadata={"help": "Weight of the SmoothL1 loss between the draft output and the target's next feature."},
    )
    feature_noise: float = field(
        default=0.0,
        metadata={
            "help": "Width of uniform noise added to the target features the draft reads during training "
            "(EAGLE uses 0.2; 0 disables it)."
        },
    )
    max_length: int | None = field(
        default=2048,
        metadata={"help": "Longest sample in tokens (image tokens included); longer records are skipped and counted."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Train only on positions that predict assistant tokens (False: every text token)."},
    )
    ttt_steps: int = field(
        default=1,
        metadata={
            "help": "Training-time test (EAGLE-3): unroll the draft this many steps on its own predicted features, "
            "each step weighted ttt_decay**i (1 = the EAGLE-1 loss; EAGLE-3 uses 7; not with a visual compressor)."
        },
    )
    ttt_decay: float = field(
        default=0.8,
        metadata={"help": "Loss weight decay per training-time-test step, in (0, 1] (EAGLE-3: 0.8)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data (.json/.jsonl) instead of loading and validating it up front: memory "
            "stays flat for large files, bad records are skipped and counted (file:line) when met. Needs max_steps."
        },
    )
    streaming_shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With --streaming: shuffle through a buffer of this many records (0: file order)."},
    )
    eval_acceptance_prompts: int = field(
        default=8,
        metadata={
            "help": "Held-out prompts decoded with the draft on evaluate() to measure the real mean acceptance "
            "length (0 disables it)."
        },
    )
    eval_acceptance_max_new_tokens: int = field(
        default=64,
        metadata={"help": "max_new_tokens of the acceptance-measuring generations."},
    )

    # Overridden TrainingArguments defaults.
    learning_rate: float = field(
        default=8e-5,
        metadata={"help": "Initial AdamW learning rate (SpecVLM: 8e-5 for 7B targets, 5e-5 for 13B targets)."},
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (SpecVLM and EAGLE use 0.95)."})
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X updates steps (an integer, or a float in (0, 1) for a ratio of total steps)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch into an output_dir that already holds a trained draft or checkpoint-* "
            "folders, replacing them (old checkpoints are deleted). Without it, and without --resume_from_checkpoint, "
            "specvlm train refuses such a folder."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training: alone (or True) from the latest checkpoint-* folder in output_dir, or from the "
            "checkpoint folder given.",
            "nargs": "?",
            "const": "True",
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Must stay False: the draft's forward signature has no pixel inputs, so True would silently "
            "drop them and the teacher would run text-only."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remove_unused_columns:
            raise UserValueError(
                "OnlineDistillationConfig requires remove_unused_columns=False: with True, Trainer keeps only the "
                "columns named in the draft's forward signature and silently drops pixel_values and attention_mask, "
                "so the teacher would run text-only."
            )
        if self.lambda_logit < 0 or self.lambda_feat < 0:
            raise UserValueError(
                f"lambda_logit and lambda_feat must be >= 0, got {self.lambda_logit} and {self.lambda_feat}."
            )
        if self.lambda_logit == 0 and self.lambda_feat == 0:
            raise UserValueError("lambda_logit and lambda_feat are both 0: there would be nothing to train.")
        if self.feature_noise < 0:
            raise UserValueError(f"feature_noise must be >= 0, got {self.feature_noise}.")
        if self.max_length is not None and self.max_length < 3:
            raise UserValueError(
                f"max_length must be >= 3 (the draft predicts token t + 2 from position t) or None, got "
                f"{self.max_length}."
            )
        if isinstance(self.ttt_steps, bool) or int(self.ttt_steps) != self.ttt_steps or self.ttt_steps < 1:
            raise UserValueError(
                f"ttt_steps must be an integer >= 1 (1 = the EAGLE-1 loss, K > 1 = EAGLE-3's training-time test "
                f"unrolled K steps), got {self.ttt_steps}."
            )
        self.ttt_steps = int(self.ttt_steps)
        if not 0 < self.ttt_decay <= 1:
            raise UserValueError(f"ttt_decay must lie in (0, 1] (EAGLE-3 uses 0.8), got {self.ttt_decay}.")
        if self.max_length is not None and self.max_length < self.ttt_steps + 2:
            raise UserValueError(
                f"max_length={self.max_length} leaves no position for step {self.ttt_steps - 1} of the training-time "
                f"test (ttt_steps={self.ttt_steps} needs max_length >= ttt_steps + 2)."
            )
        if self.streaming and self.max_steps <= 0:
            raise UserValueError(
                "streaming reads the training data as a stream of unknown length: set max_steps (the number of "
                "optimiser updates to run)."
            )
        if self.streaming_shuffle_buffer_size < 0:
            raise UserValueError(
                f"streaming_shuffle_buffer_size must be >= 0, got {self.streaming_shuffle_buffer_size}."
            )
        if self.eval_acceptance_prompts < 0:
            raise UserValueError(f"eval_acceptance_prompts must be >= 0, got {self.eval_acceptance_prompts}.")
        if self.eval_acceptance_max_new_tokens < 1:
            raise UserValueError(
                f"eval_acceptance_max_new_tokens must be >= 1, got {self.eval_acceptance_max_new_tokens}."
            )
