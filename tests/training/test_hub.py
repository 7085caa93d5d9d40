"""Model cards and Hub uploads, with the Hub client intercepted (nothing leaves the machine)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import huggingface_hub
import pytest
import transformers
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

import specvlm_hf
from specvlm_hf import hub
from specvlm_hf.hub import (
    CARD_TAGS,
    CARD_TEMPLATES,
    acceptance_eval_results,
    card_measurements,
    card_templates_dir,
    create_model_card,
    push_draft_to_hub,
    render_card,
)
from specvlm_hf.testing import build_tiny_target
from specvlm_hf.training import OnlineDistillationTrainer

from .training_helpers import make_records, requires_loop, tiny_args

HUB_TARGET = "llava-hf/llava-1.5-7b-hf"
REPO_CARDS = Path(__file__).resolve().parents[2] / "hub_cards"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])




@pytest.fixture
def hub_draft(target):
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    draft.config.target_model_name_or_path = HUB_TARGET
    return draft


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercepts repo creation and commits; records every commit's files (read while they still exist)."""
    commits = []

    def create_repo(self, repo_id, *args, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *args, commit_message=None, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                with open(source, "rb") as handle:
                    source = handle.read()
            elif not isinstance(source, bytes):
                source = source.read()
            files[operation.path_in_repo] = source
        commits.append({"repo_id": repo_id, "files": files, "message": commit_message})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0123",
            commit_message=commit_message or "",
            commit_description="",
            oid="0123",
        )

    def no_remote_card(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("no README.md in the new repository")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # upload_folder streams through hf_xet when it is installed (the single-commit path is the interceptable one) and
    # asks the Hub to validate README metadata (our tests parse it themselves)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)
    # the stock PreTrainedModel.push_to_hub first looks for an existing card on the Hub
    monkeypatch.setattr(ModelCard, "load", classmethod(no_remote_card))
    return commits


def test_card_front_matter_and_sections(hub_draft):
    card = create_model_card(
        hub_draft,
        model_id="tester/tiny-draft",
        dataset_name="liuhaotian/LLaVA-Instruct-150K",
        data_summary="9 usable of 10 records (1 skipped (missing_image: 1))",
        training={"learning_rate": 8e-5, "epochs": 1},
        mean_accept_len=2.345,
        acceptance_setup="greedy, 8 held-out prompts, max_new_tokens=64, step 10",
        speedup=1.8,
        speedup_setup="2-core CPU, bf16, batch 1",
        tags=["custom"],
    )
    metadata = _front_matter(card)
    # the measured numbers are model-index results (the Hub shows them); the model's name moves into the index
    model_index = metadata.pop("model-index")
    assert metadata == {
        "base_model": HUB_TARGET,
        "datasets": ["liuhaotian/LLaVA-Instruct-150K"],
        "library_name": "specvlm-hf",
        "tags": [*CARD_TAGS["draft"], "custom"],
    }
    assert [entry["name"] for entry in model_index] == ["tiny-draft"]
    (result,) = model_index[0]["results"]
    assert result["task"] == {"type": "image-text-to-text"}
    assert result["dataset"] == {"name": "held-out prompts", "type": "custom"}
    assert result["metrics"] == [
        {"type": "mean_acceptance_length", "value": 2.345, "name": "Mean acceptance length (bonus included)"},
        {"type": "speedup", "value": 1.8, "name": "End-to-end speedup over plain decoding"},
    ]
    assert ModelCard(card).data.eval_results[0].metric_value == 2.345  # what huggingface_hub reads back
    assert "# tiny-draft" in card
    assert f'AutoModelForImageTextToText.from_pretrained("{HUB_TARGET}"' in card
    assert 'draft = AutoModel.from_pretrained("tester/tiny-draft")' in card
    assert "out = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)" in card
    assert (
        "**Mean acceptance length: 2.35 tokens per target forward** (bonus token included: a draft that is always "
        "rejected scores 1.00; subtract 1 for accepted draft tokens per cycle); measured with tree decoding, greedy, "
        "8 held-out prompts, max_new_tokens=64, step 10." in card
    )
    assert "**Speedup: 1.80×** end-to-end over plain decoding (2-core CPU, bf16, batch 1)." in card
    assert "liuhaotian/LLaVA-Instruct-150K: 9 usable of 10 records (1 skipped (missing_image: 1))." in card
    assert "| learning_rate | 8e-05 |" in card
    assert f"- Transformers: {transformers.__version__}" in card
    assert f"- specvlm-hf: {specvlm_hf.__version__}" in card
    assert "@article{huang2025specvlm" in card and "arXiv:2509.11815" in card
    assert "full target vocabulary (96 tokens" in card


def test_card_defaults_local_target_and_text_only_target(target, tmp_path):
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    draft.config.target_model_name_or_path = str(tmp_path)  # a local path is not a Hub base model
    card = create_model_card(draft)
    metadata = _front_matter(card)
    assert "base_model" not in metadata and "datasets" not in metadata
    assert "model-index" not in metadata and metadata["model_name"] == "specvlm-draft"  # nothing measured
    assert metadata["tags"] == CARD_TAGS["draft"]
    assert "Acceptance length not measured yet" in card and "Speedup" not in card
    assert "## Training procedure" not in card  # no training information: the sections are left out

    text_target = build_tiny_target("llama")
    text_draft = specvlm_hf.SpecVLMDraftModel.from_target(text_target, draft_vocab_size=None)
    text_card = create_model_card(text_draft, model_id="tester/text-draft")
    assert "AutoModelForCausalLM" in text_card and "AutoTokenizer" in text_card
    assert '"content": "Write a short story' in text_card


def test_card_update_is_idempotent_and_keeps_user_content(hub_draft, tmp_path):
    first = create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft")
    assert (tmp_path / "README.md").read_text() == first
    assert create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft") == first

    # a user adds metadata and a section of their own
    edited = first.replace("library_name: specvlm-hf\n", "library_name: specvlm-hf\nlicense: apache-2.0\n")
    edited = edited.replace("tags:\n", "tags:\n- my-tag\n") + "\n## Notes by the author\n\nTrained on my laptop.\n"
    (tmp_path / "README.md").write_text(edited)
    updated = create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft", mean_accept_len=3.0)
    metadata = _front_matter(updated)
    assert metadata["license"] == "apache-2.0"
    assert metadata["tags"] == [*CARD_TAGS["draft"], "my-tag"]
    assert card_measurements(metadata) == {"mean_acceptance_length": 3.0}
    assert "## Notes by the author\n\nTrained on my laptop." in updated
    assert "**Mean acceptance length: 3.00 tokens" in updated and "not measured yet" not in updated
    assert create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft", mean_accept_len=3.0) == updated

    # a card that was never ours keeps its text below the generated block
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\nHand-written description.\n")
    adopted = create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft")
    assert _front_matter(adopted)["license"] == "mit"
    assert adopted.index("<!-- specvlm-hf:end -->") < adopted.index("Hand-written description.")


def test_card_update_replaces_our_results_and_keeps_the_users(hub_draft, tmp_path):
    create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft", mean_accept_len=2.0, speedup=1.5)
    # the author publishes a result of their own (another metric) next to ours
    card = ModelCard((tmp_path / "README.md").read_text())
    card.data.eval_results.append(
        huggingface_hub.EvalResult(
            task_type="image-text-to-text",
            dataset_type="lmms-lab/MMMU",
            dataset_name="MMMU",
            metric_type="accuracy",
            metric_value=0.31,
        )
    )
    (tmp_path / "README.md").write_text(str(card))

    remeasured = _front_matter(
        create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft", mean_accept_len=2.5)
    )
    assert card_measurements(remeasured) == {"mean_acceptance_length": 2.5, "accuracy": 0.31}  # no stale speedup
    assert remeasured["model-index"][0]["name"] == "tiny-draft"
    cleared = _front_matter(create_model_card(hub_draft, tmp_path, model_id="tester/tiny-draft"))
    assert card_measurements(cleared) == {"accuracy": 0.31}


def test_tags_are_defined_once():
    assert CARD_TAGS == {
        "draft": ["specvlm-hf", "speculative-decoding", "eagle", "vision-language"],
        "pocket_vlm": ["specvlm-hf", "vision-language", "llava", "pocket-vlm"],
    }
    assert set(CARD_TAGS) == set(CARD_TEMPLATES)
    # the trainer tags the draft it trains (`add_model_tags`) with the draft cards' tags
    assert OnlineDistillationTrainer._tag_names == CARD_TAGS["draft"]


def test_acceptance_eval_results():
    assert acceptance_eval_results(model_name="d") == []
    (accept,) = acceptance_eval_results(model_name="d", mean_accept_len=2.34567, task_type="text-generation")
    assert (accept.metric_type, accept.metric_value, accept.task_type) == (
        "mean_acceptance_length",
        2.346,
        "text-generation",
    )
    (speedup,) = acceptance_eval_results(model_name="d", speedup=1.25, eval_dataset="tester/prompts")
    assert (speedup.metric_type, speedup.dataset_type, speedup.dataset_name) == (
        "speedup",
        "tester/prompts",
        "tester/prompts",
    )


def test_render_card_checks_the_kind_and_keeps_the_callers_metadata():
    with pytest.raises(ValueError, match="Unknown model-card kind 'lora'.*'draft', 'pocket_vlm'"):
        render_card("lora", huggingface_hub.ModelCardData())
    card_data = huggingface_hub.ModelCardData(model_name="m", tags=["mine", "specvlm-hf"])
    text = render_card(
        "pocket_vlm",
        card_data,
        model_name="m",
        language_model={"name": "LM", "package": "lm==1", "license": "MIT"},
        vision_tower={"name": "ViT", "package": "vit==1", "license": "MIT"},
        projector_status="untrained",
        projector_training=None,
        num_parameters="10",
        dtype="torch.float32",
        provenance_file="PROVENANCE.json",
        versions={"torch": "9.9"},
    )
    assert _front_matter(text)["tags"] == [*CARD_TAGS["pocket_vlm"], "mine"]
    assert card_data.tags == ["mine", "specvlm-hf"]  # not modified
    assert "- torch: 9.9" in text and text.endswith("<!-- specvlm-hf:end -->\n")


def test_templates_are_found_from_the_installed_package():
    directory = card_templates_dir()
    packaged = resources.files("specvlm_hf").joinpath("hub_cards")
    assert packaged.is_dir() and str(directory) == str(packaged)  # package data, not the clone's folder
    names = {entry.name for entry in directory.iterdir() if entry.name.endswith(".md")}
    assert set(CARD_TEMPLATES.values()) | {"_framework_versions.md"} <= names
    if REPO_CARDS.is_dir():  # in a clone: the packaged templates are the top-level `hub_cards/` folder's
        for name in names:
            assert directory.joinpath(name).read_text() == (REPO_CARDS / name).read_text()
        pyproject = (REPO_CARDS.parent / "pyproject.toml").read_text()
        assert '"hub_cards/*.md"' in pyproject  # shipped in wheels as package data


def test_templates_fall_back_to_the_clone(monkeypatch, tmp_path, hub_draft):
    if not REPO_CARDS.is_dir():
        pytest.skip("an installed copy without the clone's hub_cards/ folder")
    (tmp_path / "specvlm_hf").mkdir()  # a package folder whose hub_cards link was lost (e.g. checked out on Windows)
    monkeypatch.setattr(hub.resources, "files", lambda package: tmp_path / "specvlm_hf")
    assert card_templates_dir() == REPO_CARDS
    assert "# tiny-draft" in create_model_card(hub_draft, model_id="tester/tiny-draft")


@requires_loop
def test_trainer_save_writes_the_card_with_the_measured_acceptance(target, processor, image_dir, tmp_path):
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    records = make_records(3, image_dir, seed=4)
    args = tiny_args(tmp_path, eval_acceptance_prompts=1, eval_acceptance_max_new_tokens=4)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=records, eval_dataset=records, processing_class=processor
    )
    trainer.train()
    measured = trainer.evaluate()["eval_mean_accept_len"]
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = _front_matter(card)
    assert metadata["tags"] == CARD_TAGS["draft"]
    assert card_measurements(metadata) == {"mean_acceptance_length": round(measured, 3)}
    assert (
        f"| Epoch | {trainer.state.epoch:g} |" in card
        and f"| Mean acceptance length (incl. bonus), held out | {measured:.2f} |" in card
    )
    assert "trust_remote_code=True" in card  # the save copied the draft's code next to it


def test_trainer_push_to_hub_uploads_the_draft_and_its_card(fake_hub, target, processor, image_dir, tmp_path):
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target)
    args = tiny_args(tmp_path, hub_model_id="tester/tiny-draft")
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=make_records(2, image_dir), processing_class=processor
    )
    trainer.train()
    trainer.push_to_hub()

    assert len(fake_hub) == 1 and fake_hub[0]["repo_id"] == "tester/tiny-draft"
    files = fake_hub[0]["files"]
    plain = tmp_path / "plain"
    draft.save_pretrained(plain)
    assert set(files) == set(os.listdir(plain)) | {"README.md", "training_args.bin"}
    card = files["README.md"].decode()
    assert card == (tmp_path / "out" / "README.md").read_text()
    assert _front_matter(card)["model_name"] == "tiny-draft" and "model-index" not in _front_matter(card)
    assert 'AutoModel.from_pretrained("tester/tiny-draft")' in card
    assert "In-memory records: 2 usable of 2 records (0 skipped)." in card
    assert "| global_steps | 1 |" in card


def test_push_draft_to_hub_uploads_one_commit(fake_hub, hub_draft, tmp_path):
    push_draft_to_hub(hub_draft, "tester/tiny-draft", mean_accept_len=2.5, acceptance_setup="greedy")
    (commit,) = fake_hub
    hub_draft.save_pretrained(tmp_path / "plain")
    assert set(commit["files"]) == set(os.listdir(tmp_path / "plain")) | {"README.md"}
    expected = create_model_card(
        hub_draft, model_id="tester/tiny-draft", mean_accept_len=2.5, acceptance_setup="greedy"
    )
    assert commit["files"]["README.md"].decode() == expected
    assert commit["message"] == "Upload SpecVLM draft"


def test_draft_push_to_hub_uploads_the_draft(fake_hub, hub_draft, tmp_path):
    hub_draft.push_to_hub("tester/tiny-draft")
    (commit,) = fake_hub
    hub_draft.save_pretrained(tmp_path / "plain")
    assert set(commit["files"]) == set(os.listdir(tmp_path / "plain")) | {"README.md"}


@pytest.mark.skipif(
    "push_to_hub" not in specvlm_hf.SpecVLMDraftModel.__dict__,
    reason="SpecVLMDraftModel.push_to_hub does not route to specvlm_hf.hub.push_draft_to_hub yet",
)
def test_draft_push_to_hub_writes_the_specvlm_card(fake_hub, hub_draft):
    hub_draft.push_to_hub("tester/tiny-draft")
    (commit,) = fake_hub
    assert commit["files"]["README.md"].decode() == create_model_card(hub_draft, model_id="tester/tiny-draft")


def test_card_measurements_read_from_text_or_metadata():
    card = "---\nmodel-index:\n- name: d\n  results:\n  - metrics:\n    - type: speedup\n      value: 1.5\n---\n# d\n"
    assert card_measurements(card) == {"speedup": 1.5}
    assert card_measurements("# a card without metadata\n") == {}
    assert card_measurements({"model-index": []}) == {}
