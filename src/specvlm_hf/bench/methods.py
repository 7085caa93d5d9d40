"""The decoding methods `specvlm bench` compares, as `generate` keyword arguments.

| Method | What runs |
|---|---|
| `generate` | plain `target.generate` (the baseline every ratio is taken against) |
| `prompt_lookup` | transformers prompt lookup decoding (`prompt_lookup_num_tokens=`) |
| `assisted` | transformers assisted generation with a small same-tokenizer assistant model |
| `specvlm_chain` | the SpecVLM draft drafting a chain: `tree_top_k=1`, `tree_total_tokens=tree_depth` |
| `specvlm_tree` | the SpecVLM draft with its tree knobs (from its config, or calibrated) |
| `specvlm_tree_compressor` | each compressor variant's draft (`--compressor-draft NAME=PATH ...`), same knobs |
| `oracle` | a perfect draft: the tree loop replaying plain `generate`'s own greedy output of the same call |

`specvlm_tree_compressor` is the elastic-compressor ablation: every variant draft (typically one per compressor
configuration, plus a compressor-less control named `none`) becomes its own [`Method`] with `variant=NAME` and the
label `compressor:NAME`, and all of them use the tree knobs of `specvlm_tree`, so that only the compressor differs.

`oracle` (issue #9) measures what the tree loop gives with a draft that is always right: at temperature 0 it replays
the plain reference of the same call (`specvlm_hf.bench.exactness.PlainReference`, plain `generate`'s own tokens)
through `generate(..., assistant_model=draft, tree_drafter=ReplayDrafterFactory(references), tree_depth=d)`, which
proposes the next `d` reference tokens as a chain plus one decoy sibling per depth (a fixed tree:
`tree_adaptive=False`, `tree_ngram_tokens=0`). One [`Method`] per depth of
`--oracle-depths` (`oracle_depth=d`, label `oracle:depthD`); the draft only routes the call (the main draft when there
is one, else an untrained `SpecVLMDraftModel.from_target(target)`). It is skipped, with a note, at temperature > 0.

A method that cannot run (no assistant, no compressor draft, or batch size > 1 for transformers' own assisted
decoding) is kept in the report with a note saying why, instead of disappearing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ..errors import UserValueError

__all__ = [
    "DEFAULT_ORACLE_DEPTHS",
    "METHODS",
    "Method",
    "TreeSettings",
    "build_methods",
    "check_method_names",
    "compressor_summary",
    "parse_variant_specs",
    "record_label",
]

METHODS: tuple[str, ...] = (
    "generate",
    "prompt_lookup",
    "assisted",
    "specvlm_chain",
    "specvlm_tree",
    "specvlm_tree_compressor",
    "oracle",
)
#: Methods whose statistics come from the SpecVLM tree loop (`out.speculation`).
SPECVLM_METHODS = ("specvlm_chain", "specvlm_tree", "specvlm_tree_compressor", "oracle")
#: `--oracle-depths` default: chain lengths of the `oracle` method.
DEFAULT_ORACLE_DEPTHS = (2, 4, 6, 8)
ORACLE_T_NOTE = "skipped: the oracle replays plain generate's greedy output, so it runs at temperature 0 only"
#: Methods that run transformers' own `_assisted_decoding` (batch size 1 only in transformers 5.23).
TRANSFORMERS_ASSISTED_METHODS = ("prompt_lookup", "assisted")


@dataclass(frozen=True)
class TreeSettings:
    """Tree knobs for one SpecVLM method (`generate(..., tree_top_k=, tree_depth=, tree_total_tokens=)`)."""

    top_k: int
    depth: int
    total_tokens: int

    def as_kwargs(self) -> dict[str, int]:
        return {"tree_top_k": self.top_k, "tree_depth": self.depth, "tree_total_tokens": self.total_tokens}


@dataclass
class Method:
    """
    One benchmarked decoding method.

    Args:
        name (`str`): one of [`METHODS`].
        generate_kwargs (`dict`): extra keyword arguments of `target.generate` (assistant model, tree knobs, ...).
        available (`bool`): whether it can run at all in this benchmark.
        note (`str`, *optional*): why it is unavailable, or what it runs with (e.g. the assistant).
        tree (`TreeSettings`, *optional*): tree knobs of SpecVLM methods.
        unsupported_batch_sizes (`dict[int, str]`): batch sizes at which it failed during warm-up, with the error.
        variant (`str`, *optional*): name of the compressor variant (`specvlm_tree_compressor` only); several methods
            of the same `name` differ by it.
        oracle_depth (`int`, *optional*): chain length of an `oracle` method (one method per depth).
    """

    name: str
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    available: bool = True
    note: str | None = None
    tree: TreeSettings | None = None
    unsupported_batch_sizes: dict[int, str] = field(default_factory=dict)
    variant: str | None = None
    oracle_depth: int | None = None

    @property
    def label(self) -> str:
        """Unique name of the method within a run: `name`, `compressor:VARIANT` for a compressor variant, or
        `oracle:depthD` for an oracle depth."""
        return _label(self.name, self.variant, self.oracle_depth)

    @property
    def is_oracle(self) -> bool:
        """Whether the method replays the plain reference (`tree_drafter=ReplayDrafterFactory(...)` per call)."""
        return self.name == "oracle"

    def runs_at_temperature(self, temperature: float) -> bool:
        """The oracle replays greedy output: temperature 0 only; every other method runs at any temperature."""
        return not (self.is_oracle and temperature > 0)

    @property
    def draft(self) -> Any:
        """The SpecVLM draft the method runs (`None` for the other methods)."""
        return self.generate_kwargs.get("assistant_model") if self.is_specvlm else None

    @property
    def is_specvlm(self) -> bool:
        return self.name in SPECVLM_METHODS

    @property
    def is_transformers_assisted(self) -> bool:
        return self.name in TRANSFORMERS_ASSISTED_METHODS

    def runs_at(self, batch_size: int) -> bool:
        return self.available and batch_size not in self.unsupported_batch_sizes


def _label(name: str, variant: str | None, oracle_depth: int | None = None) -> str:
    if oracle_depth is not None:
        name = f"{name}:depth{oracle_depth}"
    if variant is None:
        return name
    return f"{'compressor' if name == 'specvlm_tree_compressor' else name}:{variant}"


def record_label(record: Mapping[str, Any]) -> str:
    """The label of a result record (`method`, `compressor:VARIANT` for a compressor variant, `oracle:depthD` for an
    oracle depth)."""
    return _label(record["method"], record.get("variant"), record.get("oracle_depth"))


def parse_variant_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """
    Parses `--compressor-draft` values, each `PATH` or `NAME=PATH`, into `(name, path)` pairs. The name defaults to
    the last component of the path (the folder name, or the model name of a Hub id).

    Raises:
        [`~specvlm_hf.errors.UserValueError`] (a `ValueError`): on an empty name or path, or on repeated names (saying
            to use `NAME=PATH`).
    """
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or "\\" in name:  # no name given (or the `=` belongs to the path)
            name, path = "", value
        name = name.strip() or PurePath(path.rstrip("/\\")).name
        if not path or not name:
            raise UserValueError(f"--compressor-draft {value!r}: expected PATH or NAME=PATH")
        pairs.append((name, path))
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserValueError(
            f"--compressor-draft: variant name(s) {repeated} given more than once; name them with NAME=PATH"
        )
    return pairs


def compressor_summary(draft: Any) -> dict[str, Any] | None:
    """The compressor settings of a draft that matter for the ablation (`None` without a compressor)."""
    compressor = getattr(draft, "compressor", None)
    if compressor is None:
        return None
    config = compressor.config
    keys = ("mode", "primitives", "prune_ratio", "pool_ratio", "conv_ratio", "resampler_queries", "weighted_ratio",
            "prune_strategy")
    return {key: getattr(config, key) for key in keys if hasattr(config, key)}


def _compressor_note(draft: Any) -> str:
    summary = compressor_summary(draft)
    if summary is None:
        return "no compressor (ablation control: the draft sees every visual token)"
    return f"compressor mode {summary['mode']!r}, primitives {'/'.join(summary['primitives'])}"


def check_method_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Validates method names (unknown ones raise a [`~specvlm_hf.errors.UserValueError`], a `ValueError`, listing the
    valid ones); keeps order, drops repeats."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise UserValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return list(dict.fromkeys(names))


def build_methods(
    names: list[str] | tuple[str, ...],
    *,
    draft: Any = None,
    compressor_drafts: Mapping[str, Any] | None = None,
    assistant: Any = None,
    assistant_note: str | None = None,
    tree: TreeSettings | None = None,
    chain_depth: int | None = None,
    prompt_lookup_num_tokens: int = 10,
    num_assistant_tokens: int | None = None,
    oracle_draft: Any = None,
    oracle_depths: Sequence[int] = DEFAULT_ORACLE_DEPTHS,
    exact_verification: bool | None = None,
) -> list[Method]:
    """
    Builds the methods to benchmark; `generate` is always included (first) because every ratio is relative to it.

    Args:
        names (`list[str]`): subset of [`METHODS`].
        draft (`SpecVLMDraftModel`, *optional*): the draft of `specvlm_chain` / `specvlm_tree`.
        compressor_drafts (`dict[str, SpecVLMDraftModel]`, *optional*): the variants of `specvlm_tree_compressor` by
            name, one method each; a draft without a compressor is the ablation's control.
        assistant (`PreTrainedModel`, *optional*): the assistant of `assisted`.
        assistant_note (`str`, *optional*): description of the assistant for the report.
        tree (`TreeSettings`, *optional*): tree knobs of `specvlm_tree` and of every compressor variant (default: the
            draft config's, or without a draft the first variant's).
        chain_depth (`int`, *optional*): chain length of `specvlm_chain` (default: the draft config's `tree_depth`).
        prompt_lookup_num_tokens (`int`, *optional*, defaults to 10): candidate tokens per prompt-lookup step.
        num_assistant_tokens (`int`, *optional*): assistant tokens per step (default: the assistant's generation config,
            transformers' default 20 with its adaptive confidence threshold).
        oracle_draft (`SpecVLMDraftModel`, *optional*): the draft that routes the `oracle` calls (default: `draft`);
            its weights are never used.
        oracle_depths (`Sequence[int]`, *optional*, defaults to `(2, 4, 6, 8)`): one `oracle` method per depth.
        exact_verification (`bool`, *optional*): `generate(..., exact_verification=)` of every SpecVLM method
            (default: not passed, the loop's automatic choice).

    Returns:
        `list[Method]`.
    """
    names = check_method_names(names)
    if "generate" not in names:
        names = ["generate", *names]
    else:
        names = ["generate", *[name for name in names if name != "generate"]]
    if draft is not None and tree is None:
        tree = TreeSettings(draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens)
    methods = []
    for name in names:
        if name == "generate":
            methods.append(Method(name))
        elif name == "prompt_lookup":
            methods.append(
                Method(name, {"prompt_lookup_num_tokens": prompt_lookup_num_tokens},
                       note=f"prompt_lookup_num_tokens={prompt_lookup_num_tokens}")
            )
        elif name == "assisted":
            if assistant is None:
                methods.append(Method(name, available=False, note="no assistant model: pass --assistant PATH"))
            else:
                if num_assistant_tokens is not None:
                    assistant.generation_config.num_assistant_tokens = num_assistant_tokens
                methods.append(Method(name, {"assistant_model": assistant}, note=assistant_note))
        elif name == "oracle":
            router = oracle_draft if oracle_draft is not None else draft
            for depth in dict.fromkeys(int(d) for d in oracle_depths):
                if router is None:
                    methods.append(Method(name, available=False, oracle_depth=depth,
                                          note="no SpecVLM draft to route the oracle through"))
                    continue
                settings = TreeSettings(2, depth, 2 * depth)  # the replayed chain plus one decoy per depth
                # a fixed tree of exactly the replayed chain: no adaptive sizing, no n-gram branch merged into it
                fixed = {"tree_adaptive": False, "tree_ngram_tokens": 0}
                methods.append(Method(
                    name, {"assistant_model": router, **settings.as_kwargs(), **fixed}, tree=settings,
                    oracle_depth=depth,
                    note=f"perfect draft: replays plain generate's greedy output, chain of {depth} + one decoy per "
                    "depth",
                ))
        elif name in ("specvlm_chain", "specvlm_tree"):
            if draft is None:
                methods.append(Method(name, available=False, note="no SpecVLM draft: pass --draft PATH"))
                continue
            if name == "specvlm_chain":
                depth = chain_depth or draft.config.tree_depth
                settings = TreeSettings(1, depth, depth)
            else:
                settings = tree
            methods.append(Method(name, {"assistant_model": draft, **settings.as_kwargs()}, tree=settings))
        else:  # specvlm_tree_compressor: one method per variant, all with the same tree knobs
            if not compressor_drafts:
                methods.append(Method(
                    name, available=False,
                    note="skipped: no compressor draft (pass --compressor-draft [NAME=]PATH ...)",
                ))
                continue
            if tree is None:
                first = next(iter(compressor_drafts.values())).config
                tree = TreeSettings(first.tree_top_k, first.tree_depth, first.tree_total_tokens)
            for variant, variant_draft in compressor_drafts.items():
                methods.append(Method(
                    name, {"assistant_model": variant_draft, **tree.as_kwargs()}, tree=tree,
                    note=_compressor_note(variant_draft), variant=variant,
                ))
    if exact_verification is not None:
        for method in methods:
            if method.is_specvlm and method.available:
                method.generate_kwargs["exact_verification"] = bool(exact_verification)
    return methods
