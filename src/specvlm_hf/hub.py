# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads for SpecVLM drafts.

The card is rendered from `templates/draft_card.md` (TRL-style: YAML front matter with the target as `base_model`,
a quick start with `target.generate(**inputs, assistant_model=draft)`, training data and procedure, the measured
acceptance length with its convention, framework versions and the SpecVLM citation). Updating is idempotent: the
generated part sits between `<!-- specvlm-hf:start -->` and `<!-- specvlm-hf:end -->` and is replaced in place, text
outside the markers is kept, and existing metadata is merged (tags are united).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from importlib import resources
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

__all__ = ["CARD_TAGS", "SPECVLM_CITATION", "create_model_card", "push_draft_to_hub"]

#: Tags of every draft card (the Hub filters on them).
CARD_TAGS: list[str] = ["specvlm-hf", "speculative-decoding", "eagle", "vision-language"]

SPECVLM_CITATION = """@article{huang2025specvlm,
  title   = {SpecVLM: Fast Speculative Decoding in Vision-Language Models},
  author  = {Huang, Haiduo and Yang, Fuwei and Liu, Zhenhua and Yin, Xuanwu and Li, Dong and Ren, Pengju and
             Barsoum, Emad},
  journal = {arXiv preprint arXiv:2509.11815},
  year    = {2025}
}"""

_START, _END = "<!-- specvlm-hf:start -->", "<!-- specvlm-hf:end -->"
_VERSIONED = {
    "specvlm-hf": "specvlm-hf",
    "Transformers": "transformers",
    "PyTorch": "torch",
    "Datasets": "datasets",
    "Tokenizers": "tokenizers",
    "PEFT": "peft",
}


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _framework_versions() -> dict[str, str]:
    versions = {}
    for label, distribution in _VERSIONED.items():
        try:
            versions[label] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _render(**context: Any) -> str:
    try:
        import jinja2
    except ImportError as error:  # pragma: no cover - jinja2 ships with the [train] extra
        raise ImportError("Rendering model cards needs jinja2: `pip install specvlm-hf[train]`.") from error
    template = resources.files("specvlm_hf").joinpath("templates", "draft_card.md").read_text(encoding="utf-8")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template).render(**context)


def _merge_cards(existing_text: str, new_text: str) -> str:
    """Replaces the generated block of `existing_text` with `new_text`'s and merges their metadata."""
    existing, new = ModelCard(existing_text, ignore_metadata_errors=True), ModelCard(new_text)
    metadata = existing.data.to_dict()
    new_metadata = new.data.to_dict()
    tags = list(new_metadata.get("tags") or [])
    tags += [tag for tag in metadata.get("tags") or [] if tag not in tags]
    metadata.update({key: value for key, value in new_metadata.items() if value is not None})
    metadata["tags"] = tags
    block = new.text[new.text.index(_START) : new.text.index(_END) + len(_END)]
    body = existing.text
    if _START in body and _END in body:
        body = body[: body.index(_START)] + block + body[body.index(_END) + len(_END) :]
    else:
        body = "\n" + block + "\n\n" + body.lstrip("\n")
    return f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{body}"


def create_model_card(
    draft: nn.Module,
    save_directory: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    model_id: str | None = None,
    target_name_or_path: str | None = None,
    dataset_name: str | None = None,
    data_summary: str | None = None,
    training: dict[str, Any] | None = None,
    mean_accept_len: float | None = None,
    acceptance_setup: str | None = None,
    speedup: float | None = None,
    speedup_setup: str | None = None,
    tags: list[str] | None = None,
) -> str:
    r"""
    Renders the model card of a SpecVLM draft and, with `save_directory`, writes or updates its `README.md`.

    Args:
        draft ([`SpecVLMDraftModel`]): the draft (its config gives the target, architecture and tree settings).
        save_directory (`str`, *optional*): where to write `README.md`. An existing card is updated in place: the
            generated block is replaced, text outside it is kept, metadata is merged. Updating twice with the same
            arguments gives the same file.
        model_name (`str`, *optional*): card title; defaults to `model_id`'s last part or `"specvlm-draft"`.
        model_id (`str`, *optional*): Hub id (or path) used in the quick start's `AutoModel.from_pretrained`.
        target_name_or_path (`str`, *optional*): the target; defaults to `draft.config.target_model_name_or_path`.
            It becomes `base_model` unless it is a local path.
        dataset_name (`str`, *optional*): the training data's name (listed as `datasets` metadata when it is a Hub
            id, i.e. neither a local path nor a JSON file).
        data_summary (`str`, *optional*): e.g. `"9,812 usable of 10,000 records (188 skipped (missing_image: 188))"`.
        training (`dict`, *optional*): training hyperparameters shown as a table; `None` omits the training sections.
        mean_accept_len (`float`, *optional*): measured mean acceptance length, tokens per target forward with the
            bonus token **included**.
        acceptance_setup (`str`, *optional*): how it was measured (prompts, `max_new_tokens`, decoding mode).
        speedup (`float`, *optional*): measured end-to-end speedup over plain decoding.
        speedup_setup (`str`, *optional*): how the speedup was measured (hardware, dtype, batch size).
        tags (`list[str]`, *optional*): extra tags after [`CARD_TAGS`].

    Returns:
        `str`: the card text (as written).
    """
    config = draft.config
    target = target_name_or_path if target_name_or_path is not None else config.target_model_name_or_path
    base_model = target if target and not _is_local_path(target) else None
    model_id = model_id or "path/to/this/draft"
    model_name = model_name or (model_id.split("/")[-1] if model_id != "path/to/this/draft" else "specvlm-draft")
    hub_dataset = (
        dataset_name
        if dataset_name and not _is_local_path(dataset_name) and not dataset_name.endswith((".json", ".jsonl"))
        else None
    )
    card_tags = list(dict.fromkeys([*CARD_TAGS, *(tags or [])]))
    card_data = ModelCardData(
        base_model=base_model,
        library_name="specvlm-hf",
        model_name=model_name,
        tags=card_tags,
        datasets=[hub_dataset] if hub_dataset else None,
    )
    # unknown targets get the image-text quick start: this library is for vision-language models first
    multimodal = (
        config.target_model_type is None or config.target_model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )
    text = _render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        model_id=model_id,
        base_model=base_model,
        target_name=target or "path/to/target",
        target_auto_class="AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM",
        processor_class="AutoProcessor" if multimodal else "AutoTokenizer",
        multimodal=multimodal,
        fc_in=2 * config.hidden_size,
        hidden_size=config.hidden_size,
        input_norm=config.input_norm,
        num_layers=config.num_hidden_layers,
        target_layer_ids=list(config.target_layer_ids),
        draft_vocab_size=config.draft_vocab_size,
        vocab_size=config.vocab_size,
        num_parameters=f"{sum(p.numel() for p in draft.parameters()):,}",
        compressor_mode=(config.compressor_config or {}).get("mode"),
        tree_top_k=config.tree_top_k,
        tree_depth=config.tree_depth,
        tree_total_tokens=config.tree_total_tokens,
        mean_accept_len=mean_accept_len,
        acceptance_setup=acceptance_setup,
        speedup=speedup,
        speedup_setup=speedup_setup,
        training=training,
        dataset_name=dataset_name,
        data_summary=data_summary,
        versions=_framework_versions(),
        citation=SPECVLM_CITATION,
    )
    if save_directory is not None:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), "README.md")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                text = _merge_cards(handle.read(), text)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return text


def push_draft_to_hub(
    draft: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **card_kwargs: Any,
):
    r"""
    Uploads a draft with its SpecVLM model card: `config.json` (with `auto_map`), the code files, the safetensors
    weights and `README.md`, in one commit (`HfApi.create_repo` then `HfApi.create_commit`). Same arguments as
    `PreTrainedModel.push_to_hub`, plus the card arguments of [`create_model_card`] (`mean_accept_len`, `speedup`,
    `dataset_name`, ...).

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as directory:
        draft.save_pretrained(directory, max_shard_size=max_shard_size)
        tags = [*(getattr(draft, "model_tags", None) or []), *(tags or [])]
        create_model_card(draft, directory, model_id=repo_id, tags=tags, **card_kwargs)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(directory, name))
            for name in sorted(os.listdir(directory))
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload SpecVLM draft",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
