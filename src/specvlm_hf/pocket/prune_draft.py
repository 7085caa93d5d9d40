"""Shrinks the shipped draft's reduced head without retraining (`specvlm pocket prune-draft-vocab`).

On a CPU one draft expansion step is bound by reading the draft's weights, and its LM head is the largest of them (the
8,192-id head of the trained draft is half of a step's weights). [`prune_pocket_draft`] keeps the head's most frequent
ids over the same training answers that `specvlm pocket train-draft` built the vocabulary from, with their trained rows
([`~specvlm_hf.prune_draft_vocab`]), measures the real acceptance before and after on the committed benchmark prompts
(fp32 target, T = 0 and 1, as during training) and records both in `draft_provenance.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import UserValueError
from .build import package_versions
from .draft import DRAFT_DIR, load_pocket_draft
from .train_draft import (
    DRAFT_PROVENANCE_FILE,
    PocketDraftRecipe,
    bench_acceptance,
    corpus_training_file,
    default_work_dir,
    split_records,
    write_draft_card,
)

__all__ = ["prune_pocket_draft"]


def prune_pocket_draft(
    size: int,
    draft_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    work_dir: str | Path | None = None,
    corpus_dir: str | Path | None = None,
    command: str | None = None,
    overwrite_output: bool = False,
    measure: bool = True,
) -> Path:
    """
    Writes the draft of `draft_dir` (default: the shipped one) with its head pruned to `size` ids into `output_dir`
    (default: the same folder, which needs `overwrite_output=True`).

    Args:
        size (`int`): ids kept, fewer than the draft's current vocabulary.
        draft_dir (`str` or `Path`, *optional*): a trained pocket draft with `draft_provenance.json`.
        output_dir (`str` or `Path`, *optional*): where the pruned draft, its provenance and card are written.
        work_dir (`str` or `Path`, *optional*), corpus_dir (`str` or `Path`, *optional*): as for `train-draft`; the
            training records are the ones the draft was trained on (its recorded `eval_records` held out).
        command (`str`, *optional*): the command line, appended to the provenance's `commands`.
        overwrite_output (`bool`, *optional*, defaults to `False`): replace a draft already in `output_dir`.
        measure (`bool`, *optional*, defaults to `True`): measure the acceptance before and after pruning (about 4
            minutes on a 2-core CPU).

    Returns:
        `Path`: `output_dir`.
    """
    from ..training import DistillationDataset, prune_draft_vocab
    from .build import load_pocket_vlm

    draft_dir = Path(draft_dir) if draft_dir is not None else DRAFT_DIR
    output_dir = Path(output_dir) if output_dir is not None else draft_dir
    provenance_path = draft_dir / DRAFT_PROVENANCE_FILE
    if not provenance_path.is_file():
        raise UserValueError(f"{draft_dir} has no {DRAFT_PROVENANCE_FILE}: prune a draft made by `train-draft`")
    if (output_dir / "model.safetensors").is_file() and not overwrite_output:
        raise UserValueError(
            f"{output_dir} already holds a draft: pass --overwrite-output to replace it, or choose another --output-dir"
        )
    provenance = json.loads(provenance_path.read_text())
    recipe = PocketDraftRecipe(**{key: value for key, value in provenance["recipe"].items()
                                  if key in PocketDraftRecipe.__dataclass_fields__})
    target, processor = load_pocket_vlm(dtype=torch.float32)  # the acceptance is measured in fp32, as in training
    draft = load_pocket_draft(target, draft_dir)
    before = int(draft.config.draft_vocab_size or draft.config.vocab_size)
    if not 1 <= size < before:
        raise UserValueError(f"--draft-vocab-size must be in [1, {before - 1}] for this {before}-id draft, got {size}")

    train_rows, _ = split_records(
        corpus_training_file(Path(work_dir) if work_dir is not None else default_work_dir(), corpus_dir),
        recipe.eval_records,
    )
    if recipe.train_records is not None:
        train_rows = train_rows[: recipe.train_records]
    counts = DistillationDataset(train_rows, processor).label_token_counts
    total = sum(counts.values())
    coverage_before = sum(counts.get(int(i), 0) for i in draft.d2t.tolist()) / total

    progress = tqdm(total=2 * len(recipe.bench_temperatures), desc="Acceptance before/after pruning",
                    disable=not measure)
    acceptance_before = _acceptance(target, processor, draft, recipe, progress) if measure else None
    token_ids = prune_draft_vocab(draft, target, counts, size)
    acceptance_after = _acceptance(target, processor, draft, recipe, progress) if measure else None
    progress.close()

    record = {
        "command": command or f"specvlm pocket prune-draft-vocab --draft-vocab-size {size}",
        "date": time.strftime("%Y-%m-%d"),
        "from_size": before,
        "size": int(token_ids.numel()),
        "counts": f"label tokens of the {len(train_rows):,} train-draft training records",
        "coverage_before": coverage_before,
        "coverage_after": sum(counts.get(int(i), 0) for i in token_ids.tolist()) / total,
        "acceptance_before": acceptance_before,
        "acceptance_after": acceptance_after,
        "torch_threads": torch.get_num_threads(),
        "package_versions": package_versions(),
    }
    provenance["commands"] = [*(provenance.get("commands") or [provenance.get("command")]), record["command"]]
    provenance["draft_vocab_size"] = record["size"]
    provenance["vocabulary_pruning"] = record
    _write(draft.to(torch.bfloat16), provenance, draft_dir, output_dir)
    return output_dir


def _acceptance(target: Any, processor: Any, draft: Any, recipe: PocketDraftRecipe, progress: tqdm) -> dict[str, Any]:
    """The draft's acceptance on the committed benchmark prompts at each of the recipe's temperatures."""
    rows = {}
    for temperature in recipe.bench_temperatures:
        rows[f"T{temperature:g}"] = bench_acceptance(target, processor, draft, temperature=temperature,
                                                     max_new_tokens=recipe.bench_max_new_tokens)
        progress.update()
    return rows


def _write(draft: Any, provenance: dict[str, Any], draft_dir: Path, output_dir: Path) -> None:
    """Writes the draft, its provenance and card next to `output_dir`, then swaps the files in (no half-written
    folder if interrupted)."""
    staging = output_dir.with_name(output_dir.name + ".prune-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    draft.save_pretrained(staging)
    for code in staging.glob("*.py"):  # remote-code copies: the package itself provides the classes
        code.unlink()
    (staging / DRAFT_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    for name in ("acceptance_by_epoch.png", "README.md"):  # the training history; the card is regenerated below
        if (draft_dir / name).is_file():
            shutil.copy2(draft_dir / name, staging / name)
    write_draft_card(draft, staging, provenance)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        os.replace(path, output_dir / path.name)
    staging.rmdir()
