# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "specvlm-hf[train]",
# ]
# ///
# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""
Train a SpecVLM draft for a target model with online-logit distillation (SpecVLM §3.5).

This is `specvlm train` (the code lives in `specvlm_hf/training/cli.py` so that the installed command line can import
it): `ScriptArguments` (target, data, tiny mode, draft shape, self-distillation) and every `OnlineDistillationConfig` /
`TrainingArguments` flag, parsed with `HfArgumentParser`.

Smoke run on a tiny random Llava target with synthetic data (seconds on a CPU, nothing downloaded):

    uv run examples/train_draft.py --tiny llava --output_dir /tmp/tiny-draft --max_steps 4

Real target, LLaVA-format data (`{"images": [...], "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`):

    uv run examples/train_draft.py \
        --target llava-hf/llava-1.5-7b-hf \
        --data llava_v1_5_mix665k.json --eval_data val.jsonl \
        --output_dir llava-1.5-7b-specvlm-draft \
        --bf16 --per_device_train_batch_size 4 --gradient_accumulation_steps 32 --num_train_epochs 1 \
        --do_eval --eval_strategy steps --eval_steps 1000 \
        --push_to_hub --hub_model_id <you>/llava-1.5-7b-specvlm-draft

Add `--regenerate_answers --prompt_suffix "Please answer in detail."` to first rewrite the answers with the target
itself (ViSpec §4.3; resumable), and `--draft_vocab_size 8192` for an EAGLE-3-style reduced draft head.
"""

from specvlm_hf.training.cli import ScriptArguments, main, make_parser, train

__all__ = ["ScriptArguments", "main", "make_parser", "train"]

if __name__ == "__main__":
    import sys

    from specvlm_hf.cli import main as specvlm_main

    # through the `specvlm` dispatcher, so user errors print one actionable line (exit 2) instead of a traceback
    raise SystemExit(specvlm_main(["train", *sys.argv[1:]]))
