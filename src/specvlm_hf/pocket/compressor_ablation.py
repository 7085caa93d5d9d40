"""Compressor variants of the pocket draft for the elastic-compressor ablation (issue #4).

Every variant starts from the shipped trained draft (`assets/pocket/draft/`), gets a compressor (or none, the control)
and is fine-tuned jointly with it by [`OnlineDistillationTrainer`] for the same number of steps on the image records of
the draft's self-distilled training data, so the variants differ only by their compressor. The ablation table itself is
made by the benchmark (`specvlm bench --compressor-draft NAME=PATH ...`).

The pocket VLM has 49 visual tokens per image (a 7×7 grid), far fewer than LLaVA-1.5's 576, so the paper's ratios
(20× pruning and pooling) would leave 2–4 tokens; [`VARIANTS`] uses 4× for the window primitives (2×2 windows on the
grid) and 4 resampler queries.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserFileNotFoundError, UserValueError
from .draft import DRAFT_DIR
from .train_draft import default_work_dir, split_records

RATIOS = {"prune_ratio": 4, "pool_ratio": 4, "conv_ratio": 4, "resampler_queries": 4, "weighted_ratio": 4}
#: name -> compressor config overrides (None: no compressor, the control that gets the same fine-tuning).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "prune": {"mode": "select", "primitives": ["prune"]},
    "pool": {"mode": "select", "primitives": ["pool"]},
    "conv": {"mode": "select", "primitives": ["conv"]},
    "resampler": {"mode": "select", "primitives": ["resampler"]},
    "text_only": {"mode": "select", "primitives": ["text_only"]},
    "select": {"mode": "select"},
    "weighted": {"mode": "weighted"},
    "concat": {"mode": "concat"},
}


@dataclass
class AblationRecipe:
    """Fine-tuning shared by every variant (saved in each variant's provenance)."""

    train_records: int = 160
    epochs: int = 1
    learning_rate: float = 2e-4
    batch_size: int = 4
    seed: int = 3
    teacher_dtype: str = "float32"


def train_variants(
    names: list[str] | None = None,
    output_root: str | Path | None = None,
    recipe: AblationRecipe | None = None,
    base_draft: str | Path = DRAFT_DIR,
    work_dir: str | Path | None = None,
) -> dict[str, Path]:
    """
    Fine-tunes each named variant (default: all of [`VARIANTS`]) from `base_draft` and saves it under
    `output_root/<name>` (default `~/.cache/specvlm_hf/pocket-draft/ablation/`) with `ablation_provenance.json`.

    Returns:
        `dict[str, Path]`: variant name -> checkpoint folder.
    """
    from ..models import ElasticCompressorConfig, SpecVLMDraftModel
    from ..training import OnlineDistillationConfig, OnlineDistillationTrainer
    from ..training.data import DistillationDataset
    from .build import load_pocket_vlm

    recipe = recipe or AblationRecipe()
    names = names or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise UserValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    output_root = Path(output_root) if output_root is not None else work_dir / "ablation"
    if not (work_dir / "train.jsonl").is_file():
        raise UserFileNotFoundError(
            f"no self-distilled data at {work_dir / 'train.jsonl'}: run `specvlm pocket train-draft` first (it writes "
            "it there)"
        )
    if not (Path(base_draft) / "config.json").is_file():
        raise UserFileNotFoundError(f"no base draft in {base_draft}: run `specvlm pocket train-draft` first")
    target, processor = load_pocket_vlm(dtype=getattr(torch, recipe.teacher_dtype))
    train_rows, _ = split_records(work_dir / "train.jsonl", 24)
    image_rows = [row for row in train_rows if row.get("images")][: recipe.train_records]
    dataset = DistillationDataset(image_rows, processor, show_progress=False)
    base = SpecVLMDraftModel.from_pretrained(base_draft, dtype=torch.float32)
    written = {}
    for name in names:
        overrides = VARIANTS[name]
        if overrides is None:
            draft = SpecVLMDraftModel.from_pretrained(base_draft, dtype=torch.float32)
        else:
            torch.manual_seed(recipe.seed)
            compressor = ElasticCompressorConfig.for_draft(base.config, **RATIOS, **overrides)
            draft = SpecVLMDraftModel(type(base.config).from_dict({**base.config.to_dict(),
                                                                   "compressor_config": compressor.to_dict()}))
            missing, unexpected = draft.load_state_dict(base.state_dict(), strict=False)
            if unexpected or any(not key.startswith("compressor.") for key in missing):
                raise RuntimeError(f"base draft does not fit variant {name}: {missing=} {unexpected=}")
        draft = draft.float()
        args = OnlineDistillationConfig(
            output_dir=str(output_root / name / "trainer"),
            num_train_epochs=recipe.epochs,
            per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            lr_scheduler_type="constant",
            save_strategy="no",
            eval_strategy="no",
            eval_acceptance_prompts=0,
            logging_steps=10,
            report_to=[],
            seed=recipe.seed,
            use_cpu=True,
            disable_tqdm=True,
        )
        started = time.perf_counter()
        trainer = OnlineDistillationTrainer(model=draft, teacher=target, args=args, train_dataset=dataset,
                                            processing_class=processor)
        trainer.train()
        seconds = time.perf_counter() - started
        out = output_root / name
        trained = trainer.accelerator.unwrap_model(trainer.model).to(torch.bfloat16)
        trained.save_pretrained(out)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        record = {
            "variant": name,
            "compressor": overrides,
            "ratios": RATIOS if overrides is not None else None,
            "recipe": asdict(recipe),
            "base_draft": str(base_draft),
            "train_records": len(dataset),
            "seconds": seconds,
            "final_logs": logs[-1] if logs else None,
        }
        (out / "ablation_provenance.json").write_text(json.dumps(record, indent=2) + "\n")
        written[name] = out
        print(f"[ablation] {name}: {seconds:.0f} s, last log {record['final_logs']}", flush=True)
    return written


__all__ = ["AblationRecipe", "RATIOS", "VARIANTS", "train_variants"]
