"""Helpers shared by the training tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import copy
import importlib.util
import os
import random

import pytest
from PIL import Image

from specvlm_hf.testing.tiny_processors import tiny_words
from specvlm_hf.training import OnlineDistillationConfig

#: The tree-decoding loop that `target.generate(..., assistant_model=draft)` routes to; tests of real generation are
#: skipped until it exists.
HAS_LOOP = importlib.util.find_spec("specvlm_hf.generation.loop") is not None
requires_loop = pytest.mark.skipif(not HAS_LOOP, reason="specvlm_hf.generation.loop (tree decoding) is not there yet")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_images(root) -> None:
    """One PNG per colour plus a corrupt PNG in `root`."""
    for name, rgb in COLORS.items():
        Image.new("RGB", (40, 30), rgb).save(root / f"{name}.png")
    (root / "corrupt.png").write_bytes(b"definitely not a png")


def make_records(count: int, image_dir, *, seed: int = 0, answer_words: tuple[int, int] = (3, 12)) -> list[dict]:
    """`count` single-image LLaVA records with absolute image paths and answers of varied length."""
    rng = random.Random(seed)
    words = tiny_words()[:60]
    records = []
    for _ in range(count):
        color = rng.choice(sorted(COLORS))
        answer = [color] + rng.choices(words, k=rng.randint(*answer_words))
        records.append(
            {
                "images": [str(image_dir / f"{color}.png")],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + " ".join(rng.choices(words, k=4)) + " ?"},
                    {"from": "gpt", "value": " ".join(answer) + " ."},
                ],
            }
        )
    return records


def tiny_args(tmp_path, **overrides) -> OnlineDistillationConfig:
    """Fast, deterministic CPU arguments: one step, no saving, no reporting, no acceptance measurement."""
    values = dict(
        output_dir=os.fspath(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        eval_acceptance_prompts=0,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return OnlineDistillationConfig(**values)


def train_batch_vs_accumulation(initial, target, dataset, tmp_path, **overrides) -> list[dict]:
    """
    Trains two copies of `initial` for one SGD update each: batch 2 without accumulation, then batch 1 with 2
    accumulation steps (constant lr, no clipping; `overrides` are further `tiny_args`). Returns both drafts' named
    parameters, which must be equal when gradient accumulation is exact.
    """
    from specvlm_hf.training import OnlineDistillationTrainer

    results = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        draft = copy.deepcopy(initial)
        args = tiny_args(
            tmp_path / f"bs{batch_size}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            **overrides,
        )
        OnlineDistillationTrainer(model=draft, teacher=target, args=args, train_dataset=dataset).train()
        results.append(dict(draft.named_parameters()))
    return results
