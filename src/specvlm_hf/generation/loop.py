"""The tree-speculation decoding loop behind `target.generate(..., assistant_model=<SpecVLM draft>)`.

It follows the contract of transformers' decoding methods (same arguments as `_assisted_decoding`, same return types)
and is reached through the route installed at import (`specvlm_hf.generation.route`).

Batch size > 1: after one batched prefill and vision pass, every unfinished row's tree is verified in one target
forward per cycle (`batched.py`, which documents the batched KV layout), exact verification included; caches whose
sliding-window layers an earlier call trimmed (and exact verification where the GEMM probe fails at the batched row
count) keep the per-row loop below (routed explicitly, [`_batched_route`]). The steps, per row:

1. prefill the target (vision encoding included) with `output_hidden_states` for the draft's taps; emit the first
   token exactly as plain decoding does;
2. each cycle: the draft proposes an EAGLE-2 tree (unless the adaptive rule finds it not worth its cost this cycle,
   `adaptive.py`), the n-gram branch is merged in (`ngram.py`); ONE target forward verifies root + nodes with an
   additive 4-D tree mask and depth positions (3-axis mRoPE for Qwen2-VL/Qwen2.5-VL); walk the tree applying the
   logits processors to each node's own prefix (argmax, or a multinomial draw that consumes the RNG like plain
   sampling; the head's rows come from `logits_head.py`), checking every stopping criterion after every emitted token
   (from the emitted tokens at once for max-length / eos criteria, `stopping.py`); compact the KV cache in place;
   hand the accepted features to the draft, which catches up on them before its next tree.

With a draft that has an elastic visual compressor, step 1 hands the drafter a mask of the prompt's visual positions
(and, where the layout gives one, each image's raster grid: square runs of LLaVA / Gemma3 / Idefics3, the mRoPE
height/width positions of Qwen images) so that the draft's prefill is compressed; the target is never compressed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .acceptance import greedy_token_ids, sample_token, walk_tree
from transformers.cache_utils import DynamicSlidingWindowLayer

from .batched import BatchedTreeDecoder, PerRowDrafters
from .cache_utils import (
    batched_layout_supported,
    check_cache_supported,
    compact,
    select_row,
    tree_attention_mask,
    unslide_layers,
)
from .drafter import BatchedEagleTreeDrafter, EagleTreeDrafter, TreeKnobs
from .adaptive import AdaptiveTreeSizer
from .drafters import DrafterContext, EagleDrafterFactory
from .ngram import matched_prefix, merge_branch, ngram_candidate
from .exact_attention import (
    RowwisePlan,
    exact_attention_selected,
    probe_exact_verification,
    probe_linear_shapes,
)
from .route import GENERATE_KNOBS
from .logits_head import (
    LAZY_HEAD_DEVICES,
    SlotLogits,
    find_logits_head,
    grouped_argmax_error_scale,
    head_mode_for,
)
from .stats import SpeculationStats
from .stopping import simple_stops
from .tree import DraftTree, children_table, position_ids_for_tree
from .verification import synchronize, verify_forward
from .visual_layout import image_grids, paired_visual_mask, visual_token_ids

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

logger = logging.get_logger(__name__)

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class SpecVLMGenerateOutput(GenerateDecoderOnlyOutput):
    """
    `GenerateDecoderOnlyOutput` plus the speculation statistics of the call.

    Args:
        speculation (`SpeculationStats`): target forwards, tokens accepted per cycle, acceptance per depth, ...
            `speculation.mean_accept_len` counts the bonus token (see `specvlm_hf.generation.stats`).
    """

    speculation: SpeculationStats | None = None


def _adaptive_tree(draft: Any, generation_config: "GenerationConfig") -> bool:
    """`tree_adaptive` of the call, else of the draft config, else True (see `adaptive.py`)."""
    requested = getattr(generation_config, "tree_adaptive", None)
    if requested is None:
        requested = getattr(draft.config, "tree_adaptive", True)
    return bool(requested)


#: Defaults of the n-gram branch for drafts whose config predates the knobs (see `ngram.py`).
NGRAM_DEFAULTS = {"tree_ngram_tokens": 10, "tree_ngram_max": 3}  # = SpecVLMDraftConfig's defaults


def _ngram_knobs(draft: Any, generation_config: "GenerationConfig") -> tuple[int, int]:
    """(candidate length, longest suffix) of the n-gram branch: per call, else the draft config, else the defaults."""
    values = []
    for name, default in NGRAM_DEFAULTS.items():
        value = getattr(generation_config, name, None)
        if value is None:
            value = getattr(draft.config, name, default)
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        values.append(int(value))
    return values[0], max(values[1], 1)


def _tree_knobs(draft: Any, generation_config: "GenerationConfig") -> TreeKnobs:
    values = {}
    for name in GENERATE_KNOBS:
        override = getattr(generation_config, name, None)
        values[name[len("tree_"):]] = int(override if override is not None else getattr(draft.config, name))
    return TreeKnobs(**values)


def _validate(target: "PreTrainedModel", draft: Any, generation_config: "GenerationConfig", model_kwargs: dict) -> None:
    draft.check_compatible(target)
    if not model_kwargs.get("use_cache", True):
        raise ValueError("A SpecVLM draft needs the KV cache: call generate with use_cache=True (the default).")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r} is not supported with a SpecVLM draft; "
            "use the default dynamic cache."
        )
    attn = {target.config._attn_implementation, target.config.get_text_config()._attn_implementation}
    unsupported = attn - set(SUPPORTED_ATTENTION) - {None}
    if unsupported:
        raise ValueError(
            f"attn_implementation={sorted(unsupported)[0]!r} cannot take the tree attention mask used for verification. "
            "Load the target with attn_implementation='sdpa' (or 'eager'), e.g. "
            "`target.set_attn_implementation('sdpa')`, to use a SpecVLM draft."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "output_attentions / output_hidden_states are not available with a SpecVLM draft (tree verification "
            "computes several candidate tokens per forward). Generate without the draft to inspect them."
        )
    draft_device = next(draft.parameters()).device
    if draft_device != target.get_output_embeddings().weight.device:
        raise ValueError(
            f"The draft is on {draft_device} but the target's LM head is on "
            f"{target.get_output_embeddings().weight.device}; move the draft with `draft.to(...)`."
        )


def _uncached_length(
    input_ids: torch.Tensor, past_length: int, generation_config: "GenerationConfig", model_kwargs: dict
) -> int:
    """
    How many trailing prompt positions the prefill must compute when the cache already holds `past_length` positions.

    Mirrors plain decoding's prefill: `input_ids` is either the whole sequence (sliced to what the cache lacks) or only
    the new tokens, which the attention mask (always the whole sequence) tells apart.
    """
    if not past_length:
        return input_ids.shape[1]
    attention_mask = model_kwargs.get("attention_mask")
    mask_length = attention_mask.shape[1] if attention_mask is not None else getattr(generation_config, "_mask_length", -1)
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "generate(inputs_embeds=..., past_key_values=<a cache holding a prefix>) with a SpecVLM draft is not "
            "supported: pass input_ids (the whole sequence or the new tokens) to continue from a cache."
        )
    length = input_ids.shape[1] - past_length if mask_length == input_ids.shape[1] else input_ids.shape[1]
    if length < 1:
        raise ValueError(
            f"The cache already holds {past_length} positions but the input has {input_ids.shape[1]}: nothing is left "
            "to prefill. Pass a sequence longer than the cache (its last token is the one generation continues from)."
        )
    return length


def _positive_layer_ids(target: "PreTrainedModel", layer_ids: list[int]) -> list[int]:
    n_states = target.config.get_text_config().num_hidden_layers + 1
    return sorted({i % n_states for i in layer_ids})



class _RowDecoder:
    """Decodes one batch row after the shared prefill. State lives here, per call, never on the models."""

    def __init__(self, target, draft, drafter, cache, n_pad, next_position, mrope_axes, layer_ids, head,
                 logits_processor, stopping_criteria, generation_config, streamer, stats, exact=False,
                 padded_batch=False, sizer=None, ngram=(0, 3)):
        self.target, self.draft, self.drafter, self.cache = target, draft, drafter, cache
        self.n_pad, self.next_position, self.mrope_axes = n_pad, next_position, mrope_axes
        self.layer_ids = layer_ids
        text_config = target.config.get_text_config()
        self.final_layer = text_config.num_hidden_layers  # hidden_states[L] is the final-normed state fed to the head
        self.verify_layer_ids = sorted(set(layer_ids) | {self.final_layer})
        self.head = head
        self.head_mode = head_mode_for(head, target.get_output_embeddings().weight.dtype)
        self.root_only = torch.tensor([0], device=target.get_output_embeddings().weight.device)
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.simple_stops = simple_stops(stopping_criteria)  # stopping.py: checked from the emitted tokens, or None
        self.do_sample = bool(generation_config.do_sample)
        self.keep_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        self.keep_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)
        self.layer_types = getattr(target.config.get_text_config(), "layer_types", None)
        self.streamer, self.stats = streamer, stats
        self.exact = exact  # verification attention reproduces one-token decoding row by row (exact_attention.py)
        self.padded_batch = padded_batch  # the call's batch had left padding (plain decoding then masks every row)
        self.sizer = sizer  # adaptive tree rule fed with every cycle's measurements (adaptive.py)
        self.ngram_tokens, self.ngram_max = ngram  # the n-gram branch (ngram.py); 0 tokens = off
        self.row, self.batch_size = 0, 1  # the row's index in the generate call's batch, and that batch's size
        self.no_draft = DraftTree.from_parents(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        self.scores: list[torch.Tensor] = []
        self.raw_logits: list[torch.Tensor] = []

    # one token from one slot's logits, on that slot's own prefix
    def _choose(self, prefix: torch.Tensor, logits: torch.Tensor) -> int:
        if not len(self.logits_processor):
            processed = logits
        elif self.batch_size > 1:
            # processors may keep per-batch-row state (the repetition penalty's padding lengths, a prefix function's
            # batch id): call them batch-shaped, this row's prefix in every row, and keep this row's result
            processed = self.logits_processor(prefix.repeat(self.batch_size, 1), logits.repeat(self.batch_size, 1))
            processed = processed[self.row : self.row + 1]
        else:
            processed = self.logits_processor(prefix, logits)
        if self.keep_scores:
            self.scores.append(processed)
        if self.keep_logits:
            self.raw_logits.append(logits)
        if self.do_sample:
            return sample_token(torch.softmax(processed, dim=-1)[0])
        return int(greedy_token_ids(processed).item())

    def _stops(self, ids: torch.Tensor) -> bool:
        return bool(self.stopping_criteria(ids, None).any())

    def first_token(self, ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        token = self._choose(ids, logits)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=-1)
        if self.streamer is not None:
            self.streamer.put(ids[:, -1:].cpu())
        return ids, self._stops(ids)

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """Speculates until a stopping criterion fires; `ids` `(1, length)` ends with the not-yet-verified root."""
        device = self.target.get_output_embeddings().weight.device
        dtype = self.target.dtype
        fast_greedy = not self.do_sample and len(self.logits_processor) == 0 and not (self.keep_scores or self.keep_logits)
        # float32 greedy reads: a slot's head row is computed with its likely descendants' under a margin check
        error_scale = grouped_argmax_error_scale(self.head) if fast_greedy and self.head_mode == "row" else None
        while True:
            cycle_started = time.perf_counter()
            candidate = (ngram_candidate(ids[0, self.n_pad :], self.ngram_tokens, self.ngram_max)
                         if self.ngram_tokens else None)
            if self.sizer is not None:
                self.sizer.expect_ngram(0 if candidate is None else candidate.numel())
            # adaptive trees: a cycle where the draft's nodes are not worth their cost verifies the n-gram branch
            # (or the root alone) and the draft catches up later
            drafted = self.sizer is None or self.sizer.should_draft()
            draft_before = self.drafter.stats.seconds
            tree = self.drafter.propose() if drafted else self.no_draft
            draft_seconds = self.drafter.stats.seconds - draft_before
            draft_nodes = tree.num_nodes
            if not drafted:
                self.stats.undrafted_cycles += 1
            if candidate is not None:
                tree = merge_branch(tree, candidate)
            n_block = tree.num_nodes + 1
            block = torch.cat([ids[0, -1:].cpu(), tree.tokens]).view(1, -1).to(ids.device)
            padding: dict[str, torch.Tensor] | None = {} if self.exact else None
            mask = tree_attention_mask(self.cache, self.layer_types, tree.ancestors, tree.depths, self.n_pad, dtype,
                                       device, padding=padding)
            positions = position_ids_for_tree(tree.depths, self.next_position, self.mrope_axes).to(device)
            out, verify_seconds = verify_forward(
                self.target, block, mask, positions, self.cache, self.verify_layer_ids,
                self.root_only if self.head_mode != "model" else 0,
                plan=RowwisePlan.from_masks(mask, padding, self.padded_batch) if self.exact else None,
            )
            self.stats.target_seconds += verify_seconds
            logits = SlotLogits(out.logits[0], out.hidden_states[self.final_layer][0], self.head, self.head_mode,
                                tree=tree, error_scale=error_scale)
            children = children_table(tree)
            if fast_greedy:
                choose = lambda slot, emitted: logits.argmax(slot)  # noqa: E731
            else:
                def choose(slot: int, emitted: list[int]) -> int:
                    prefix = torch.cat([ids, ids.new_tensor([emitted])], dim=-1) if emitted else ids
                    return self._choose(prefix, logits[slot])

            if fast_greedy and self.simple_stops is not None:
                # max-length / eos only: walk the whole accepted path, then cut it after the first token that stops
                path, emitted, _ = walk_tree(children, choose)
                stop_at = self.simple_stops.first_stop(emitted, ids.shape[-1])
                stopped = stop_at is not None
                if stopped:
                    emitted, path = emitted[: stop_at + 1], path[: stop_at + 2]
                ids = torch.cat([ids, ids.new_tensor([emitted])], dim=-1)
                self.simple_stops.warn_past_positions(ids.shape[-1])
            else:
                state = {"ids": ids}

                def stop(emitted: list[int]) -> bool:
                    state["ids"] = torch.cat([ids, ids.new_tensor([emitted])], dim=-1)
                    return self._stops(state["ids"])

                path, emitted, stopped = walk_tree(children, choose, stop)
                ids = state["ids"]
            self.stats.target_seconds += logits.seconds  # the target's LM head, applied outside its forward
            self.stats.verify_seconds_per_forward.append(verify_seconds + logits.seconds)
            keep = path[: len(emitted)]
            compact(self.cache, n_block, keep)
            self.stats.record_cycle(len(path) - 1, len(emitted), tree.num_nodes)
            if self.streamer is not None:
                self.streamer.put(ids[:, -len(emitted):].cpu())
            if stopped:
                return ids
            features = self.draft.select_features(out.hidden_states)[0, keep]
            self.drafter.extend(features[None], torch.tensor(emitted))
            self.next_position += len(emitted)
            if self.sizer is not None:
                self._observe(tree, path, verify_seconds + logits.seconds, cycle_started, candidate, emitted,
                              draft_nodes=draft_nodes, draft_seconds=draft_seconds, drafted=drafted)

    def _observe(self, tree, path: list[int], verify_seconds: float, cycle_started: float,
                 candidate: torch.Tensor | None = None, emitted: list[int] | None = None, *,
                 draft_nodes: int | None = None, draft_seconds: float | None = None, drafted: bool = True) -> None:
        """
        Feeds one cycle's measurements to the adaptive tree rule (`adaptive.py`): the verified `tree` (the draft's
        first `draft_nodes` nodes, then the n-gram branch's own), the accepted `path` (slots, root first), how far
        the cycle's n-gram `candidate` agreed with the `emitted` tokens, and the draft's time this cycle when known.
        """
        if candidate is not None and candidate.numel() and emitted is not None:
            self.sizer.observe_ngram(candidate.numel(), matched_prefix(candidate.tolist(), emitted))
        draft_nodes = tree.num_nodes if draft_nodes is None else draft_nodes
        # the draft is credited with the accepted nodes it proposed (branch nodes it shared included); the slots past
        # its own are the n-gram branch's, credited to the branch by observe_ngram
        accepted = sum(1 for slot in path[1:] if slot <= draft_nodes)
        gains = tree.scores[:draft_nodes].float().exp()
        node_depths = tree.depths[1 : draft_nodes + 1]
        # the deepest level the drafter expanded (0 when none of its nodes was worth keeping)
        deepest = gains[node_depths == self.sizer.depth].sum()
        self.sizer.observe(
            nodes=tree.num_nodes,
            predicted=float(gains.sum()),
            accepted=accepted,
            verify_seconds=verify_seconds,
            step_seconds=getattr(self.drafter, "last_step_seconds", None) if drafted else None,
            cycle_seconds=time.perf_counter() - cycle_started,
            deepest_gain=float(deepest),
            draft_seconds=draft_seconds,
            drafted=drafted,
            draft_nodes=draft_nodes,
        )


@torch.no_grad()
def tree_assisted_decoding(
    self: "PreTrainedModel",
    input_ids: torch.LongTensor,
    logits_processor: "LogitsProcessorList",
    stopping_criteria: "StoppingCriteriaList",
    generation_config: "GenerationConfig",
    synced_gpus: bool = False,
    streamer: "BaseStreamer | None" = None,
    inputs_tensor: torch.Tensor | None = None,
    assistant_model: Any = None,
    assistant_tokenizer: Any = None,
    tokenizer: Any = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    r"""
    Tree speculative decoding with a SpecVLM draft; reached through `target.generate(..., assistant_model=draft)`.

    Takes the arguments of transformers' `_assisted_decoding`. Greedy output is token-identical to plain
    `generate`; sampled output has exactly the target's distribution (every logits processor of the generation config
    is applied to each candidate's own prefix). Extra per-call knobs: `tree_top_k`, `tree_depth`, `tree_total_tokens`.

    Returns:
        `torch.LongTensor` of shape `(batch_size, sequence_length)`, or with `return_dict_in_generate=True` a
        [`SpecVLMGenerateOutput`] carrying `sequences`, optional `scores`/`logits` (batch 1 only), `past_key_values`
        (batch 1 only) and `speculation` statistics.
    """
    target, draft = self, assistant_model
    if target.config.is_encoder_decoder:
        raise ValueError("SpecVLM drafts support decoder-only targets (VLMs and causal LMs).")
    _validate(target, draft, generation_config, model_kwargs)
    # the most query rows one verification forward holds at batch size 1 (root + draft nodes + n-gram branch)
    block_rows = _tree_knobs(draft, generation_config).total_tokens + _ngram_knobs(draft, generation_config)[0] + 1
    exact = _use_exact_verification(target, generation_config, block_rows)
    with exact_attention_selected(target, enabled=exact) as exact:
        return _decode(target, draft, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                       exact, model_kwargs)


def _linear_shapes(target: "PreTrainedModel") -> list[tuple[int, int]]:
    """`(in_features, out_features)` of the target's decoder linear layers (the LM head excluded)."""
    head = target.get_output_embeddings()
    return sorted({(m.in_features, m.out_features) for m in target.get_decoder().modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _use_exact_verification(target: "PreTrainedModel", generation_config: "GenerationConfig", block_rows: int = 65
                            ) -> bool:
    """
    Whether verification runs the exact row-wise attention (`exact_attention.py`): `exact_verification=True/False`
    per call, else automatically on CPUs where the target runs SDPA in bf16/fp16, the kernels pass the probe and the
    target's own linear layers are row-invariant for every row count up to `block_rows` (`probe_linear_shapes`), i.e.
    where it makes verification bitwise plain decoding's. Where the linear layers are not, the row-wise attention
    cannot give that guarantee and costs one attention call per node and layer (about 2x the verification forward in
    bf16 on a 2-core AVX512-BF16 CPU), so the automatic choice is the fast path, said once; `exact_verification=True`
    still runs it (it removes the multi-token attention's rounding, not the GEMMs').
    """
    requested = getattr(generation_config, "exact_verification", None)
    text_config = target.config.get_text_config()
    sdpa = text_config._attn_implementation == "sdpa"
    device = target.get_output_embeddings().weight.device
    dtype = target.get_output_embeddings().weight.dtype
    if requested is False:
        return False
    if requested is None and device.type != "cpu":
        # automatic only on CPUs, where it was measured; on accelerators one small kernel per node and layer would
        # cost more than the whole verification (pass exact_verification=True to try it)
        return False
    if not sdpa:
        if requested:
            raise ValueError(
                f"exact_verification=True needs the target's text model on attn_implementation='sdpa' (it runs "
                f"{text_config._attn_implementation!r}): load it with attn_implementation='sdpa'."
            )
        return False
    probe = probe_exact_verification(device, dtype, hidden_size=text_config.hidden_size)
    if probe.exact and dtype in (torch.bfloat16, torch.float16):
        linear = probe_linear_shapes(device, dtype, _linear_shapes(target), block_rows)
        if not linear.exact:
            if requested:
                logger.warning_once(
                    f"exact_verification=True: {linear.reason} on this machine, so a {dtype} verification forward "
                    "can still round some rows differently from one-token decoding; greedy output can differ from "
                    "plain generate at (rare) near-tie tokens. float32 avoids it. See the README's 'Lossless' section."
                )
                return True
            logger.warning_once(
                f"{dtype} greedy output may differ from plain generate at near-tie tokens on this machine "
                f"({linear.reason}), so verification runs the fast path; exact_verification=True runs the row-wise "
                "attention anyway (fewer differences, slower), float32 avoids them. See the README's 'Lossless' section."
            )
            return False
    if requested and not probe.exact:
        logger.warning_once(f"exact_verification=True on a machine whose kernels fail the probe ({probe.reason}): "
                            "verification runs row by row but may still round differently from plain decoding.")
        return True
    if not probe.exact and dtype in (torch.bfloat16, torch.float16):
        logger.warning_once(
            f"{dtype} greedy output may differ from plain generate at near-tie tokens on this machine ({probe.reason}); "
            "float32 avoids it. See the README's 'Lossless' section."
        )
    return bool(requested) or (probe.exact and dtype in (torch.bfloat16, torch.float16))


def _decode(target, draft, input_ids, logits_processor, stopping_criteria, generation_config, streamer, exact,
            model_kwargs):
    started = time.perf_counter()
    knobs = _tree_knobs(draft, generation_config)
    factory = getattr(generation_config, "tree_drafter", None) or EagleDrafterFactory()
    adaptive = _adaptive_tree(draft, generation_config)
    ngram = _ngram_knobs(draft, generation_config)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    cache = model_kwargs.get("past_key_values")
    check_cache_supported(cache)
    cache.activate_past_recording()
    batch_size, prompt_len = input_ids.shape
    if batch_size > 1 and (generation_config.output_scores or generation_config.output_logits):
        raise ValueError("output_scores/output_logits with a SpecVLM draft are supported for batch size 1 only.")
    if batch_size > 1 and streamer is not None:
        # plain decoding hands a batch streamer one token per row per step; rows decoded one after another cannot
        raise ValueError(
            f"Streaming with a SpecVLM draft supports batch size 1 only (got {batch_size} rows), like transformers' "
            "own TextStreamer / TextIteratorStreamer: stream one prompt per generate call, or drop the streamer."
        )
    if getattr(generation_config, "prompt_lookup_num_tokens", None):
        logger.warning_once(
            "prompt_lookup_num_tokens is ignored when a SpecVLM draft is the assistant_model: the draft's tree is "
            "verified instead (output is unchanged either way)."
        )

    layer_ids = _positive_layer_ids(target, draft.feature_layer_ids)
    final_layer = target.config.get_text_config().num_hidden_layers
    # a cache that already holds a prefix (multi-turn chat, a prefilled system prompt, the cache of an earlier call):
    # prefill only the positions it does not hold, exactly as plain decoding's prefill slices them
    past_length = cache.get_seq_length()
    new_length = _uncached_length(input_ids, past_length, generation_config, model_kwargs)
    model_inputs = target.prepare_inputs_for_generation(
        input_ids, next_sequence_length=new_length if past_length else None, is_first_iteration=True, **model_kwargs
    )
    model_inputs["output_hidden_states"] = sorted(set(layer_ids) | {final_layer})
    prefill_started = time.perf_counter()
    outputs = target(**model_inputs, return_dict=True)
    synchronize(input_ids.device)
    prefill_seconds = time.perf_counter() - prefill_started
    hidden_states = outputs.hidden_states
    embeddings = hidden_states[0]
    features = draft.select_features(hidden_states)
    last_logits = outputs.logits[:, -1].float()
    head = None
    if target.get_output_embeddings().weight.device.type in LAZY_HEAD_DEVICES:
        head = find_logits_head(target, hidden_states[final_layer][:1, -1:], last_logits[:1])
    del outputs, model_inputs

    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs.get("position_ids")
    mrope_axes = 3 if position_ids is not None and position_ids.dim() == 3 else 0
    embed_tokens, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    layer_types = getattr(target.config.get_text_config(), "layer_types", None)

    n_pads = [int(prompt_len - attention_mask[r].sum()) if attention_mask is not None else 0 for r in range(batch_size)]
    # The draft catches up on the prefilled positions only (a prefix already in the cache has no target features; the
    # draft then starts without it, which costs acceptance, never correctness). `starts[r]`: the first prompt index of
    # row r that was prefilled and is not padding; hidden state `j` belongs to prompt index `new_start + j`.
    new_start = prompt_len - new_length
    starts = [max(n_pads[r], new_start) for r in range(batch_size)]
    # prompt tokens paired with the draft's prefill positions: x_{s+1} .. x_{L-1} of each row
    paired_rows = [input_ids[r, starts[r] + 1 :] for r in range(batch_size)]
    visual_ids = visual_token_ids(target) if getattr(draft, "compressor", None) is not None else []
    grids = None
    if visual_ids:
        paired_positions = [position_ids[-3:, r, starts[r] + 1 :] for r in range(batch_size)] if mrope_axes else None
        grids = image_grids(target.config.model_type, paired_rows, visual_ids, paired_positions)

    stats = SpeculationStats(exact_verification=exact, target_seconds=prefill_seconds,
                             target_prefill_seconds=prefill_seconds)
    block_rows = knobs.total_tokens + ngram[0] + 1
    batched = batch_size > 1 and _batched_route(target, cache, exact, generation_config, batch_size * block_rows,
                                                block_rows)
    windows: dict[str, int] = {}
    if batched:
        windows = {layer_types[i] if layer_types else "full_attention": layer.sliding_window
                   for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicSlidingWindowLayer)}
        unslide_layers(cache)
    rows: list[torch.Tensor] = []
    row_decoders: list[_RowDecoder] = []
    pending: list[tuple[int, Any]] = []  # batched route: (row, prefilled drafter) of the rows still decoding
    for r in range(batch_size):
        n_pad = n_pads[r]
        row_cache = cache if batch_size == 1 or batched else select_row(cache, r)
        if not batched:
            row_cache.crop(0)  # re-trim sliding-window layers, as plain assisted decoding does
        if position_ids is None:
            next_position = prompt_len - n_pad
        elif mrope_axes:
            next_position = int(position_ids[-3:, r, -1].max()) + 1
        else:
            next_position = int(position_ids[r, -1]) + 1
        sizer = AdaptiveTreeSizer(knobs.depth, knobs.total_tokens) if adaptive else None
        context = DrafterContext(draft=draft, embed_tokens=embed_tokens, lm_head=lm_head, knobs=knobs, row=r,
                                 prompt_ids=input_ids[r, n_pad:], vocab_size=vocab_size, sizer=sizer)
        drafter = factory(context)
        row_stats = SpeculationStats(prefill_tokens=prompt_len - starts[r])
        decoder = _RowDecoder(target, draft, drafter, row_cache, n_pad, next_position, mrope_axes, layer_ids, head,
                              logits_processor, stopping_criteria, generation_config, streamer, row_stats, exact,
                              padded_batch=any(n_pads), sizer=sizer, ngram=ngram)
        decoder.row, decoder.batch_size = r, batch_size
        ids, finished = decoder.first_token(input_ids[r : r + 1], last_logits[r : r + 1])
        if not finished:
            first = ids[:, -1:]
            offset = starts[r] - new_start  # index of the row's first draft pair among the prefilled hidden states
            row_embeds = torch.cat([embeddings[r : r + 1, offset + 1 :], embed_tokens(first.to(embed_tokens.weight.device))], dim=1)
            visual_mask = paired_visual_mask(paired_rows[r], visual_ids) if visual_ids else None
            drafter.prefill(row_embeds, features[r : r + 1, offset:], visual_mask, grids[r] if grids else None,
                            start_position=starts[r] - n_pad)
            if batched:
                pending.append((r, drafter))
            else:
                ids = decoder.run(ids)
        if not batched:
            stats = stats.merge(_with_drafter_stats(row_stats, drafter.stats))
        else:
            stats = stats.merge(row_stats) if finished else stats
        rows.append(ids)
        row_decoders.append(decoder)
    if batched:
        del embeddings, features, hidden_states
        rows, stats = _decode_batched(target, draft, cache, row_decoders, pending, rows, windows, stats)
    if streamer is not None:
        streamer.end()
    stats.total_seconds = time.perf_counter() - started

    width = max(row.shape[-1] for row in rows)
    pad_id = generation_config._pad_token_tensor
    pad_value = int(pad_id.flatten()[0]) if pad_id is not None else 0
    sequences = torch.full((batch_size, width), pad_value, dtype=input_ids.dtype, device=input_ids.device)
    for r, row in enumerate(rows):
        sequences[r, : row.shape[-1]] = row.reshape(-1)
    if not generation_config.return_dict_in_generate:
        return sequences
    decoder = row_decoders[0]
    return SpecVLMGenerateOutput(
        sequences=sequences,
        scores=tuple(decoder.scores) if generation_config.output_scores else None,
        logits=tuple(decoder.raw_logits) if generation_config.output_logits else None,
        past_key_values=cache if batch_size == 1 else None,
        speculation=stats,
    )


def _batched_route(target, cache, exact: bool, generation_config: "GenerationConfig", max_rows: int,
                   block_rows: int) -> bool:
    """
    Whether a batch > 1 is verified in one forward per cycle (`batched.py`) rather than row after row. The per-row loop
    stays for: a cache whose sliding-window layers an earlier call already trimmed (rows would not share columns),
    exact verification where the target's linear layers are row-invariant up to one row's block (`block_rows`) but
    not up to the batched forward's `max_rows` (batching would cost the bitwise equality; where they fail already for
    one block, neither path is bitwise and the batch is verified at once), and `tree_batched=False` per call.
    """
    if getattr(generation_config, "tree_batched", None) is False or not batched_layout_supported(cache):
        return False
    if exact:
        weight = target.get_output_embeddings().weight
        shapes = _linear_shapes(target)
        if (probe_linear_shapes(weight.device, weight.dtype, shapes, block_rows).exact
                and not probe_linear_shapes(weight.device, weight.dtype, shapes, max_rows).exact):
            logger.warning_once("exact verification verifies batch rows one after another here: the target's linear "
                                f"layers are row-invariant for one row's block but not for the {max_rows} rows of a "
                                "batched verification forward.")
            return False
    return True


def _with_drafter_stats(row_stats: SpeculationStats, drafter_stats) -> SpeculationStats:
    """A row's stats with its drafter's counters filled in."""
    row_stats.draft_forwards = drafter_stats.forwards
    row_stats.draft_prefill_tokens = drafter_stats.prefill_tokens
    row_stats.draft_prefill_seconds = drafter_stats.prefill_seconds
    row_stats.draft_seconds = drafter_stats.seconds
    row_stats.draft_step_seconds = drafter_stats.step_seconds
    row_stats.draft_steps = drafter_stats.steps
    row_stats.compressor_choices = drafter_stats.compressor_choices
    return row_stats


def _decode_batched(target, draft, cache, decoders: list[_RowDecoder], pending: list[tuple[int, Any]],
                    rows: list[torch.Tensor], windows: dict[str, int], stats: SpeculationStats):
    """
    Runs the rows still decoding after their first token through [`BatchedTreeDecoder`] and returns every row's ids
    and the merged stats. The EAGLE draft drafts batched ([`BatchedEagleTreeDrafter`]); other drafters row by row.
    """
    if not pending:
        return rows, stats
    active = [r for r, _ in pending]
    drafters = [drafter for _, drafter in pending]
    if all(type(drafter) is EagleTreeDrafter for drafter in drafters):
        batch_drafter = BatchedEagleTreeDrafter(drafters)
        for drafter in drafters:
            drafter.cache = None  # the batched drafter holds the rows' draft caches now
    else:
        batch_drafter = PerRowDrafters(drafters)
    lengths = [row.shape[-1] for row in rows]
    capacity = max(lengths) + 64
    sequences = rows[0].new_zeros((len(rows), capacity))
    for r, row in enumerate(rows):
        sequences[r, : row.shape[-1]] = row.reshape(-1)
    decoder = BatchedTreeDecoder(target, draft, cache, decoders, batch_drafter, active, sequences, lengths, windows)
    decoder.run()
    out_rows = [decoder.sequences[r, : decoder.lengths[r]] for r in range(len(rows))]
    for r in active:
        stats = stats.merge(decoders[r].stats)
    if isinstance(batch_drafter, BatchedEagleTreeDrafter):
        draft_stats = batch_drafter.stats
        stats = stats.merge(_with_drafter_stats(SpeculationStats(), draft_stats))
    else:
        for drafter in drafters:
            stats = stats.merge(_with_drafter_stats(SpeculationStats(), drafter.stats))
    stats.batched_forwards = decoder.verify_forwards
    stats.verify_seconds_per_forward = stats.verify_seconds_per_forward + decoder.seconds_per_forward
    stats.target_seconds += decoder.verify_seconds
    return out_rows, stats
