# Copyright 2026 the specvlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads: the one renderer of every card the project writes.

Every card (a draft saved by the trainer or pushed with [`push_draft_to_hub`], the pocket VLM, the pocket VLM's shipped
draft) is rendered by [`render_card`] from a Jinja template of the repository's top-level `hub_cards/` folder:

- `hub_cards/draft.md`: any SpecVLM draft (TRL-style: the target as `base_model`, a quick start with
  `target.generate(**inputs, assistant_model=draft)`, the draft's architecture, the measured acceptance length with its
  convention, training data and procedure, framework versions and the SpecVLM citation). The shipped pocket draft uses
  the same template: its differences (a quick start through the pocket loaders, the acceptance per epoch, the command
  that reproduces it) are optional sections, so every draft card has one layout and one metadata schema.
- `hub_cards/pocket_vlm.md`: the pocket VLM (a target, not a draft: its parts, licences and projector training).
- `hub_cards/_*.md`: sections shared by several cards (framework versions); never rendered alone.

The templates ship inside the package (`specvlm_hf/hub_cards` links to the top-level folder and is package data), and
[`card_templates_dir`] falls back to the clone's folder where that link is missing. The tags of each kind of card are
defined once, in [`CARD_TAGS`]. A measured mean acceptance length and speedup become `model-index` results in the YAML
metadata (`huggingface_hub.EvalResult`), so the Hub shows them beside the model.

Updating is idempotent: the generated part sits between `<!-- specvlm-hf:start -->` and `<!-- specvlm-hf:end -->` and
is replaced in place, text outside the markers is kept, and existing metadata is merged (tags are united; results of
other metrics are kept, this project's measured results are replaced by the new ones or removed when no longer given).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

__all__ = [
    "card_measurements",
    "CARD_TAGS",
    "CARD_TEMPLATES",
    "SPECVLM_CITATION",
    "acceptance_eval_results",
    "card_templates_dir",
    "create_model_card",
    "push_draft_to_hub",
    "render_card",
]

#: Tags of every card the project writes, by card kind (the Hub filters on them). The one place they are defined:
#: [`render_card`] puts them first in every card of that kind.
CARD_TAGS: dict[str, list[str]] = {
    "draft": ["specvlm-hf", "speculative-decoding", "eagle", "vision-language"],
    "pocket_vlm": ["specvlm-hf", "vision-language", "llava", "pocket-vlm"],
}

#: Template file of each card kind, in [`card_templates_dir`].
CARD_TEMPLATES: dict[str, str] = {"draft": "draft.md", "pocket_vlm": "pocket_vlm.md"}

SPECVLM_CITATION = """@article{huang2025specvlm,
  title   = {SpecVLM: Fast Speculative Decoding in Vision-Language Models},
  author  = {Huang, Haiduo and Yang, Fuwei and Liu, Zhenhua and Yin, Xuanwu and Li, Dong and Ren, Pengju and
             Barsoum, Emad},
  journal = {arXiv preprint arXiv:2509.11815},
  year    = {2025}
}"""

_START, _END = "<!-- specvlm-hf:start -->", "<!-- specvlm-hf:end -->"
_TEMPLATES_FOLDER = "hub_cards"
#: `model-index` metric types this project measures; an update replaces (or removes) them and keeps all others.
_ACCEPTANCE_METRIC, _SPEEDUP_METRIC = "mean_acceptance_length", "speedup"
_MEASURED_METRICS = (_ACCEPTANCE_METRIC, _SPEEDUP_METRIC)
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


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repository id (not a local path, valid id syntax), else `None`."""
    if not name or _is_local_path(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _framework_versions() -> dict[str, str]:
    versions = {}
    for label, distribution in _VERSIONED.items():
        try:
            versions[label] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def card_templates_dir() -> Traversable:
    r"""
    The folder holding the card templates.

    An installed copy (wheel or editable install) finds them as package data, `specvlm_hf/hub_cards` (in the
    repository a link to the top-level `hub_cards/` folder, copied into the wheel as plain files). A clone whose
    checkout dropped the link (e.g. Windows without symlink support) falls back to the top-level `hub_cards/` folder
    next to `src/`.

    Returns:
        `importlib.resources.abc.Traversable`: the folder (a `pathlib.Path` for the clone fallback).

    Raises:
        `FileNotFoundError`: neither location holds the templates (a broken installation).
    """
    packaged = resources.files("specvlm_hf").joinpath(_TEMPLATES_FOLDER)
    if packaged.is_dir():
        return packaged
    clone = Path(__file__).resolve().parents[2] / _TEMPLATES_FOLDER
    if clone.is_dir():
        return clone
    raise FileNotFoundError(
        f"The model-card templates are missing: neither the package data `specvlm_hf/{_TEMPLATES_FOLDER}` nor "
        f"`{clone}` exists. Reinstall specvlm-hf (`pip install --force-reinstall specvlm-hf`)."
    )


def acceptance_eval_results(
    *,
    model_name: str,
    mean_accept_len: float | None = None,
    speedup: float | None = None,
    task_type: str = "image-text-to-text",
    eval_dataset: str | None = None,
) -> list[EvalResult]:
    r"""
    The measured mean acceptance length and speedup as `model-index` results (`huggingface_hub.EvalResult`).

    Args:
        model_name (`str`): the model's name (`model-index` entries are named).
        mean_accept_len (`float`, *optional*): mean acceptance length, bonus token **included**; `None` leaves it out.
        speedup (`float`, *optional*): end-to-end speedup over plain decoding; `None` leaves it out.
        task_type (`str`, *optional*, defaults to `"image-text-to-text"`): the target's Hub task
            (`"text-generation"` for text-only targets).
        eval_dataset (`str`, *optional*): what the numbers were measured on; a Hub dataset id is also the results'
            dataset type. Defaults to `"held-out prompts"`.

    Returns:
        `list[EvalResult]`: zero, one or two results (rounded to 3 decimals); empty when nothing was measured.
    """
    dataset_name = eval_dataset or "held-out prompts"
    common = {
        "task_type": task_type,
        "dataset_name": dataset_name,
        "dataset_type": _hub_id(eval_dataset) or "custom",
    }
    results = []
    if mean_accept_len is not None:
        results.append(
            EvalResult(
                metric_type=_ACCEPTANCE_METRIC,
                metric_name="Mean acceptance length (bonus included)",
                metric_value=round(float(mean_accept_len), 3),
                **common,
            )
        )
    if speedup is not None:
        results.append(
            EvalResult(
                metric_type=_SPEEDUP_METRIC,
                metric_name="End-to-end speedup over plain decoding",
                metric_value=round(float(speedup), 3),
                **common,
            )
        )
    return results


def card_measurements(card: str | dict[str, Any]) -> dict[str, float]:
    """
    The measured results a card publishes: `model-index` metric type -> value (e.g. `{"mean_acceptance_length":
    2.63, "speedup": 1.04}`), from the card's text (its YAML front matter is read) or its metadata dict; `{}` when it
    publishes none.
    """
    if isinstance(card, str):
        import yaml

        parts = card.split("---\n")
        card = (yaml.safe_load(parts[1]) if card.startswith("---\n") and len(parts) > 2 else None) or {}
    metadata = card
    return {
        metric["type"]: metric["value"]
        for entry in metadata.get("model-index", [])
        for result in entry["results"]
        for metric in result["metrics"]
    }


def _environment():
    try:
        import jinja2
    except ImportError as error:  # pragma: no cover - jinja2 ships with the [train] and [pocket] extras
        raise ImportError("Rendering model cards needs jinja2: `pip install specvlm-hf[train]`.") from error
    directory = card_templates_dir()

    def load(name: str) -> str | None:
        template = directory.joinpath(name)
        return template.read_text(encoding="utf-8") if template.is_file() else None

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _merge_cards(existing_text: str, new_text: str) -> str:
    """Replaces the generated block of `existing_text` with `new_text`'s and merges their metadata."""
    existing, new = ModelCard(existing_text, ignore_metadata_errors=True), ModelCard(new_text)
    metadata = existing.data.to_dict()
    new_metadata = new.data.to_dict()
    tags = list(new_metadata.get("tags") or [])
    tags += [tag for tag in metadata.get("tags") or [] if tag not in tags]
    # this project's measured results come from the new card only; results of other metrics are the user's: kept
    eval_results = list(new.data.eval_results or [])
    eval_results += [
        result for result in existing.data.eval_results or [] if result.metric_type not in _MEASURED_METRICS
    ]
    model_name = new.data.model_name or existing.data.model_name
    metadata.pop("model-index", None)
    new_metadata.pop("model-index", None)
    metadata.update({key: value for key, value in new_metadata.items() if value is not None})
    metadata["tags"] = tags
    metadata.pop("model_name", None)
    if model_name is not None:
        metadata["model_name"] = model_name
    if eval_results and model_name is not None:
        metadata["eval_results"] = eval_results
    block = new.text[new.text.index(_START) : new.text.index(_END) + len(_END)]
    body = existing.text
    if _START in body and _END in body:
        body = body[: body.index(_START)] + block + body[body.index(_END) + len(_END) :]
    else:
        body = "\n" + block + "\n\n" + body.lstrip("\n")
    return f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{body}"


def render_card(
    kind: str,
    card_data: ModelCardData,
    save_directory: str | os.PathLike | None = None,
    **context: Any,
) -> str:
    r"""
    Renders a model card of the given kind and, with `save_directory`, writes or updates its `README.md`.

    The one renderer of every card the project writes: the template `CARD_TEMPLATES[kind]` of [`card_templates_dir`]
    is rendered (Jinja, undefined names are errors) with `context`, placed between the generated-block markers under
    the YAML front matter of `card_data`, whose tags are prefixed with `CARD_TAGS[kind]`.

    Args:
        kind (`str`): the card kind, a key of [`CARD_TEMPLATES`] (`"draft"`, `"pocket_vlm"`).
        card_data (`huggingface_hub.ModelCardData`): the metadata (give `eval_results` from
            [`acceptance_eval_results`] to publish measured numbers as `model-index` results). Not modified.
        save_directory (`str` or `os.PathLike`, *optional*): where to write `README.md`. An existing card is updated
            in place: the generated block is replaced, text outside it is kept, metadata is merged. Updating twice
            with the same arguments gives the same file.
        **context: the template's values. `versions` (framework name → version) defaults to the installed versions
            and `citation` to [`SPECVLM_CITATION`].

    Returns:
        `str`: the card text (as written).

    Example:

    ```python
    >>> from huggingface_hub import ModelCardData
    >>> from specvlm_hf.hub import render_card
    >>> card = render_card("pocket_vlm", ModelCardData(model_name="pocket VLM"), **pocket_context)  # doctest: +SKIP
    ```
    """
    if kind not in CARD_TEMPLATES:
        raise ValueError(f"Unknown model-card kind {kind!r}; the kinds are {sorted(CARD_TEMPLATES)}.")
    metadata = copy.deepcopy(card_data)
    metadata.tags = list(dict.fromkeys([*CARD_TAGS[kind], *(card_data.tags or [])]))
    context.setdefault("versions", _framework_versions())
    context.setdefault("citation", SPECVLM_CITATION)
    body = _environment().get_template(CARD_TEMPLATES[kind]).render(**context).strip("\n")
    text = f"---\n{metadata.to_yaml()}\n---\n\n{_START}\n{body}\n{_END}\n"
    if save_directory is not None:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), "README.md")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                text = _merge_cards(handle.read(), text)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return text


def create_model_card(
    draft: nn.Module,
    save_directory: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    model_id: str | None = None,
    target_name_or_path: str | None = None,
    dataset_name: str | None = None,
    data_summary: str | None = None,
    training: Mapping[str, Any] | None = None,
    mean_accept_len: float | None = None,
    acceptance_setup: str | None = None,
    speedup: float | None = None,
    speedup_setup: str | None = None,
    eval_dataset: str | None = None,
    accept_len_by_epoch: Iterable[tuple[float, float]] | None = None,
    description: str | None = None,
    quick_start: str | None = None,
    reproduce: str | None = None,
    framework_versions: Mapping[str, str] | None = None,
    tags: list[str] | None = None,
) -> str:
    r"""
    Renders the model card of a SpecVLM draft (`hub_cards/draft.md`) and, with `save_directory`, writes or updates its
    `README.md`. Used by the trainer's saves, [`push_draft_to_hub`] and the pocket VLM's shipped draft.

    Args:
        draft ([`SpecVLMDraftModel`]): the draft (its config gives the target, architecture and tree settings).
        save_directory (`str`, *optional*): where to write `README.md`. An existing card is updated in place: the
            generated block is replaced, text outside it is kept, metadata is merged. Updating twice with the same
            arguments gives the same file.
        model_name (`str`, *optional*): card title and `model-index` name; defaults to `model_id`'s last part or
            `"specvlm-draft"`.
        model_id (`str`, *optional*): Hub id (or path) used in the quick start's `AutoModel.from_pretrained`.
        target_name_or_path (`str`, *optional*): the target; defaults to `draft.config.target_model_name_or_path`.
            It becomes `base_model` when it is a Hub id (not a local path, nor a free-form name).
        dataset_name (`str`, *optional*): the training data's name (listed as `datasets` metadata when it is a Hub
            id, i.e. neither a local path nor a JSON file).
        data_summary (`str`, *optional*): e.g. `"9,812 usable of 10,000 records (188 skipped (missing_image: 188))"`.
        training (`Mapping`, *optional*): training hyperparameters shown as a table; `None` omits the training
            sections.
        mean_accept_len (`float`, *optional*): measured mean acceptance length, tokens per target forward with the
            bonus token **included**. Published as a `model-index` result too.
        acceptance_setup (`str`, *optional*): how it was measured (prompts, `max_new_tokens`, decoding mode).
        speedup (`float`, *optional*): measured end-to-end speedup over plain decoding. Published as a `model-index`
            result too.
        speedup_setup (`str`, *optional*): how the speedup was measured (hardware, dtype, batch size).
        eval_dataset (`str`, *optional*): what the acceptance and speedup were measured on (the `model-index`
            results' dataset); defaults to `"held-out prompts"`.
        accept_len_by_epoch (`Iterable[tuple[float, float]]`, *optional*): `(epoch, mean acceptance length)` pairs
            measured during training, shown as a table.
        description (`str`, *optional*): a paragraph shown under the introduction.
        quick_start (`str`, *optional*): Python code replacing the generic quick start (for a target that is not
            loaded by name, like the pocket VLM).
        reproduce (`str`, *optional*): the command that trains this draft again (shown with the training procedure).
        framework_versions (`Mapping[str, str]`, *optional*): package versions to list; defaults to the installed
            ones (give the versions that trained the draft when rendering a card later).
        tags (`list[str]`, *optional*): extra tags after `CARD_TAGS["draft"]`.

    Returns:
        `str`: the card text (as written).
    """
    config = draft.config
    target = target_name_or_path if target_name_or_path is not None else config.target_model_name_or_path
    base_model = _hub_id(target)
    model_id = model_id or "path/to/this/draft"
    model_name = model_name or (model_id.split("/")[-1] if model_id != "path/to/this/draft" else "specvlm-draft")
    hub_dataset = _hub_id(dataset_name) if dataset_name and not dataset_name.endswith((".json", ".jsonl")) else None
    # unknown targets get the image-text quick start: this library is for vision-language models first
    multimodal = (
        config.target_model_type is None or config.target_model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )
    card_data = ModelCardData(
        base_model=base_model,
        library_name="specvlm-hf",
        model_name=model_name,
        tags=list(tags or []),
        datasets=[hub_dataset] if hub_dataset else None,
        eval_results=acceptance_eval_results(
            model_name=model_name,
            mean_accept_len=mean_accept_len,
            speedup=speedup,
            task_type="image-text-to-text" if multimodal else "text-generation",
            eval_dataset=eval_dataset,
        )
        or None,
    )
    # the draft's code travels with it (`auto_map`) when `save_pretrained` copied it: a fresh card is assumed to go
    # with such a save (`push_draft_to_hub`, trainer saves); a folder without the code files says so
    remote_code = save_directory is None or (
        os.path.isdir(save_directory) and any(name.endswith(".py") for name in os.listdir(save_directory))
    )
    context: dict[str, Any] = {}
    if framework_versions is not None:
        context["versions"] = dict(framework_versions)
    return render_card(
        "draft",
        card_data,
        save_directory,
        model_name=model_name,
        model_id=model_id,
        base_model=base_model,
        target_name=target or "path/to/target",
        target_auto_class="AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM",
        processor_class="AutoProcessor" if multimodal else "AutoTokenizer",
        multimodal=multimodal,
        remote_code=remote_code,
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
        accept_len_by_epoch=[(float(epoch), float(value)) for epoch, value in accept_len_by_epoch or ()],
        training=dict(training) if training else None,
        dataset_name=dataset_name,
        data_summary=data_summary,
        description=description,
        quick_start=quick_start.strip("\n") if quick_start else None,
        reproduce=reproduce,
        **context,
    )


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
    `dataset_name`, ...); the draft's `model_tags` (the trainer adds its tags) are added to the card's.

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
