"""Tiny random target models and matching inputs for tests.

Every model is built from a config written in code (nothing is read from the Hub), seeded, and small enough that a
forward takes milliseconds on a CPU. Weights are drawn with a large `initializer_range` so that greedy decoding is
varied and top-1/top-2 logit gaps are far above float noise, which exact-equality tests need.

All families share one token layout for a vocabulary of size `V` (see [`reserved_token_ids`]):

- `0` / `1` / `2`: pad / bos / eos;
- `3 … V-9`: ordinary text tokens (what [`make_inputs`] samples);
- `V-8 … V-5`: reserved, unused by the models;
- `V-4` / `V-3`: image block start / end (Qwen `<|vision_start|>` / `<|vision_end|>`, Gemma3 `<start_of_image>` /
  `<end_of_image>`, Idefics3 `<global-img>` / `<fake_token_around_image>`);
- `V-2`: video placeholder (Qwen2-VL / Qwen2.5-VL config only);
- `V-1`: image placeholder.

[`make_inputs`] builds what the family's processor would return (same keys, shapes and placeholder layout) without
needing a tokenizer, an image processor or torchvision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

__all__ = [
    "FAMILIES",
    "MULTIMODAL_FAMILIES",
    "TEXT_FAMILIES",
    "build_tiny_target",
    "make_inputs",
    "reserved_token_ids",
    "split_rows",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "llama", "qwen2")
MULTIMODAL_FAMILIES: tuple[str, ...] = FAMILIES[:6]
TEXT_FAMILIES: tuple[str, ...] = FAMILIES[6:]

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
_FIRST_TEXT_ID = 3
_NUM_RESERVED_TOP = 8
_MIN_VOCAB_SIZE = 16

# Shared text-model size. Large `initializer_range`: std 0.02 gives near-uniform logits on models this small.
_HIDDEN = 64
_INTERMEDIATE = 128
_HEADS = 4
_KV_HEADS = 2
_LAYERS = 2
_INIT_STD = 0.2
# Scale of the eos row of the LM head: eos stays reachable but rarely ends a 30-token greedy run early.
_EOS_LOGIT_SCALE = 0.75
_MAX_POSITIONS = 512

# Vision sizes (all square crops): image tokens per image are given next to each family's config.
_LLAVA_IMAGE, _LLAVA_PATCH = 24, 8  # 3 x 3 patches (+ CLS, dropped) -> 9 tokens
_LLAVA_NEXT_CROP, _LLAVA_NEXT_PATCH = 16, 8  # 2 x 2 patches per crop
_LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
_LLAVA_NEXT_IMAGE_SIZES = ((32, 32), (16, 32))  # (height, width) for even / odd rows: 24 / 14 tokens
_QWEN_PATCH, _QWEN_TEMPORAL_PATCH, _QWEN_MERGE = 4, 2, 2
_QWEN_GRIDS = ((1, 4, 4), (1, 4, 6))  # (t, h, w) in patches for even / odd rows: 4 / 6 tokens
_IDEFICS3_IMAGE, _IDEFICS3_PATCH, _IDEFICS3_SCALE = 32, 8, 2  # 4 x 4 patches, pixel shuffle 2 -> 4 tokens
_GEMMA3_IMAGE, _GEMMA3_PATCH, _GEMMA3_TOKENS = 16, 4, 4  # 4 x 4 patches, 2 x 2 average pool -> 4 tokens
_GEMMA3_SLIDING_WINDOW = 6
_GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

_PER_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})


def reserved_token_ids(vocab_size: int = 96) -> dict[str, int]:
    """
    Special token ids of the tiny models for a given vocabulary size.

    Args:
        vocab_size (`int`, *optional*, defaults to 96):
            Vocabulary size of the text model.

    Returns:
        `dict[str, int]`: ids for `"pad"`, `"bos"`, `"eos"`, `"image_start"`, `"image_end"`, `"video"` and `"image"`,
        plus `"first_text"` / `"last_text"`, the inclusive range that [`make_inputs`] samples ordinary tokens from.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB_SIZE}, got {vocab_size}")
    return {
        "pad": PAD_TOKEN_ID,
        "bos": BOS_TOKEN_ID,
        "eos": EOS_TOKEN_ID,
        "first_text": _FIRST_TEXT_ID,
        "last_text": vocab_size - _NUM_RESERVED_TOP - 1,
        "image_start": vocab_size - 4,
        "image_end": vocab_size - 3,
        "video": vocab_size - 2,
        "image": vocab_size - 1,
    }


def _llama_text_kwargs(vocab_size: int) -> dict:
    """Keyword arguments shared by every Llama-like tiny text config."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "initializer_range": _INIT_STD,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "tie_word_embeddings": False,
    }


def _small_vision_kwargs(image_size: int, patch_size: int) -> dict:
    """Keyword arguments shared by the tiny CLIP / SigLIP / Idefics3 vision towers."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "initializer_range": _INIT_STD,
    }


def _mrope_text_kwargs(vocab_size: int) -> dict:
    """Qwen2-VL / Qwen2.5-VL text config: mRoPE sections 2/3/3 cover head_dim / 2 = 8 (real models: 16/24/24)."""
    kwargs = _llama_text_kwargs(vocab_size)
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return kwargs


def _llava_config(vocab_size: int) -> LlavaConfig:
    """Llava-1.5 style: CLIP tower (feature layer -2, CLS dropped), 2-layer GELU projector, Llama text model."""
    ids = reserved_token_ids(vocab_size)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_small_vision_kwargs(_LLAVA_IMAGE, _LLAVA_PATCH), projection_dim=32),
        text_config=LlamaConfig(**_llama_text_kwargs(vocab_size)),
        image_token_index=ids["image"],
        image_seq_length=(_LLAVA_IMAGE // _LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _llava_next_config(vocab_size: int) -> LlavaNextConfig:
    """Llava-NeXT style: anyres crops over `_LLAVA_NEXT_PINPOINTS`, unpadding and image-newline tokens."""
    ids = reserved_token_ids(vocab_size)
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_small_vision_kwargs(_LLAVA_NEXT_CROP, _LLAVA_NEXT_PATCH), projection_dim=32),
        text_config=LlamaConfig(**_llama_text_kwargs(vocab_size)),
        image_token_index=ids["image"],
        image_grid_pinpoints=[list(p) for p in _LLAVA_NEXT_PINPOINTS],
        image_seq_length=(_LLAVA_NEXT_CROP // _LLAVA_NEXT_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _qwen_ids(vocab_size: int) -> dict[str, int]:
    """Qwen2-VL / Qwen2.5-VL placeholder ids, as config keyword arguments."""
    ids = reserved_token_ids(vocab_size)
    return {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["image_start"],
        "vision_end_token_id": ids["image_end"],
    }


def _qwen2_vl_config(vocab_size: int) -> Qwen2VLConfig:
    """Qwen2-VL: ViT with 2-D RoPE and 2 x 2 patch merger, mRoPE text model."""
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": _HIDDEN,
        "mlp_ratio": 2,
        "num_heads": 4,
        "patch_size": _QWEN_PATCH,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH,
        "spatial_merge_size": _QWEN_MERGE,
        "initializer_range": _INIT_STD,
    }
    return Qwen2VLConfig(text_config=_mrope_text_kwargs(vocab_size), vision_config=vision, **_qwen_ids(vocab_size))


def _qwen2_5_vl_config(vocab_size: int) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: windowed ViT (2 x 2 merged-patch windows, last block full attention), mRoPE text model."""
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": _HIDDEN,
        "num_heads": 4,
        "patch_size": _QWEN_PATCH,
        "temporal_patch_size": _QWEN_TEMPORAL_PATCH,
        "spatial_merge_size": _QWEN_MERGE,
        "window_size": 2 * _QWEN_MERGE * _QWEN_PATCH,
        "fullatt_block_indexes": [1],
        "initializer_range": _INIT_STD,
    }
    return Qwen2_5_VLConfig(text_config=_mrope_text_kwargs(vocab_size), vision_config=vision, **_qwen_ids(vocab_size))


def _idefics3_config(vocab_size: int) -> Idefics3Config:
    """Idefics3 / SmolVLM: SigLIP-like tower, pixel-shuffle connector, Llama text model."""
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**_small_vision_kwargs(_IDEFICS3_IMAGE, _IDEFICS3_PATCH)),
        text_config=LlamaConfig(**_llama_text_kwargs(vocab_size)),
        image_token_id=reserved_token_ids(vocab_size)["image"],
        scale_factor=_IDEFICS3_SCALE,
        pad_token_id=PAD_TOKEN_ID,
    )


def _gemma3_config(vocab_size: int) -> Gemma3Config:
    """
    Gemma3: SigLIP tower pooled to `_GEMMA3_TOKENS` soft tokens, hybrid sliding (window 6) / full text layers.

    Unlike the released checkpoints the LM head is not tied: with random weights a tied Gemma3 (whose input embeddings
    are scaled by `sqrt(hidden_size)`) greedily repeats its last input token forever.
    """
    ids = reserved_token_ids(vocab_size)
    text = Gemma3TextConfig(
        **{
            **_llama_text_kwargs(vocab_size),
            "num_hidden_layers": len(_GEMMA3_LAYER_TYPES),
            "head_dim": _HIDDEN // _HEADS,
            "query_pre_attn_scalar": _HIDDEN // _HEADS,
            "sliding_window": _GEMMA3_SLIDING_WINDOW,
            "layer_types": list(_GEMMA3_LAYER_TYPES),
        }
    )
    return Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_small_vision_kwargs(_GEMMA3_IMAGE, _GEMMA3_PATCH), vision_use_head=False),
        mm_tokens_per_image=_GEMMA3_TOKENS,
        image_token_index=ids["image"],
        boi_token_index=ids["image_start"],
        eoi_token_index=ids["image_end"],
        initializer_range=_INIT_STD,
        tie_word_embeddings=False,
    )


def _llama_config(vocab_size: int) -> LlamaConfig:
    """Plain Llama text model."""
    return LlamaConfig(**_llama_text_kwargs(vocab_size))


def _qwen2_config(vocab_size: int) -> Qwen2Config:
    """Plain Qwen2 text model (no sliding window)."""
    return Qwen2Config(**_llama_text_kwargs(vocab_size))


_BUILDERS: dict[str, tuple[type[PreTrainedModel], Callable[[int], PreTrainedConfig]]] = {
    "llava": (LlavaForConditionalGeneration, _llava_config),
    "llava_next": (LlavaNextForConditionalGeneration, _llava_next_config),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, _qwen2_vl_config),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_config),
    "idefics3": (Idefics3ForConditionalGeneration, _idefics3_config),
    "gemma3": (Gemma3ForConditionalGeneration, _gemma3_config),
    "llama": (LlamaForCausalLM, _llama_config),
    "qwen2": (Qwen2ForCausalLM, _qwen2_config),
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_target(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vocab_size: int = 96,
) -> PreTrainedModel:
    """
    Build a tiny randomly initialised target model of one family.

    Weights are drawn in float32 from `torch.manual_seed(seed)` inside `torch.random.fork_rng` (the caller's RNG state
    is left untouched) and then cast to `dtype`, so the same seed gives the same weights (up to rounding) whatever the
    dtype. All configs use `initializer_range=0.2`, which keeps top-1/top-2 logit gaps far above float32 noise; the
    eos row of the LM head is scaled by 0.75 so that greedy runs of ~30 tokens seldom stop early (eos stays reachable).

    Args:
        family (`str`):
            One of [`FAMILIES`].
        seed (`int`, *optional*, defaults to 0):
            Seed for the weight initialisation.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the returned model.
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`):
            Attention implementation for the text model and the vision tower (`"sdpa"` and `"eager"` are tested).
        vocab_size (`int`, *optional*, defaults to 96):
            Vocabulary size of the text model; see [`reserved_token_ids`] for the special ids inside it.

    Returns:
        [`~transformers.PreTrainedModel`]: the model in eval mode, with a greedy `generation_config` carrying
        `pad_token_id=0`, `bos_token_id=1` and `eos_token_id=2`.
    """
    _check_family(family)
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB_SIZE}, got {vocab_size}")
    model_class, make_config = _BUILDERS[family]
    config = make_config(vocab_size)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        if family == "gemma3":
            # Gemma3 zero-initialises its image projection, which would make every image embed to zeros.
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=_INIT_STD)
        model.get_output_embeddings().weight[EOS_TOKEN_ID].mul_(_EOS_LOGIT_SCALE)
    model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, do_sample=False
    )
    return model.eval()


def _llava_next_num_crops(height: int, width: int) -> int:
    """Number of crops the Llava-NeXT image processor makes for an image: the anyres grid plus the base image."""
    best_height, best_width = select_best_resolution((height, width), _LLAVA_NEXT_PINPOINTS)
    return (best_height // _LLAVA_NEXT_CROP) * (best_width // _LLAVA_NEXT_CROP) + 1


def _llava_next_num_tokens(height: int, width: int) -> int:
    """Image placeholder count for a Llava-NeXT image, as `LlavaNextProcessor._get_number_of_features` computes it."""
    best_height, best_width = select_best_resolution((height, width), _LLAVA_NEXT_PINPOINTS)
    side = _LLAVA_NEXT_CROP // _LLAVA_NEXT_PATCH
    grid_height = side * (best_height // _LLAVA_NEXT_CROP)
    grid_width = side * (best_width // _LLAVA_NEXT_CROP)
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        grid_height -= 2 * ((grid_height - new_height) // 2)
    else:
        new_width = int(round(width * (grid_height / height), 7))
        grid_width -= 2 * ((grid_width - new_width) // 2)
    # unpadded grid, one newline token per grid row, then the base crop (its CLS dropped by the "default" strategy)
    return grid_height * grid_width + grid_height + side * side


def _text_tokens(generator: torch.Generator, n: int, vocab_size: int) -> list[int]:
    """`n` ordinary text ids (never pad, bos, eos or a reserved multimodal id)."""
    ids = reserved_token_ids(vocab_size)
    return torch.randint(ids["first_text"], ids["last_text"] + 1, (n,), generator=generator).tolist()


def _image_row(
    family: str, config: PreTrainedConfig, row: int, generator: torch.Generator
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """
    Placeholder block and pixel inputs for one image of one batch row.

    Returns:
        `tuple[list[int], dict[str, torch.Tensor]]`: the token ids that replace the image in the prompt (start/end
        markers included) and the row's pixel tensors with a leading batch-like dimension of 1 (Qwen: flattened
        patches of the row's image, concatenated over rows by the caller).
    """
    ids = reserved_token_ids(config.get_text_config().vocab_size)
    image, start, end = ids["image"], ids["image_start"], ids["image_end"]
    if family == "llava":
        side = _LLAVA_IMAGE // _LLAVA_PATCH
        pixels = torch.randn(1, 3, _LLAVA_IMAGE, _LLAVA_IMAGE, generator=generator)
        return [image] * (side * side), {"pixel_values": pixels}
    if family == "llava_next":
        height, width = _LLAVA_NEXT_IMAGE_SIZES[row % 2]
        crops = _llava_next_num_crops(height, width)
        pixels = torch.randn(1, crops, 3, _LLAVA_NEXT_CROP, _LLAVA_NEXT_CROP, generator=generator)
        tokens = [image] * _llava_next_num_tokens(height, width)
        return tokens, {"pixel_values": pixels, "image_sizes": torch.tensor([[height, width]])}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        grid = torch.tensor([_QWEN_GRIDS[row % 2]])
        patch_dim = 3 * _QWEN_TEMPORAL_PATCH * _QWEN_PATCH * _QWEN_PATCH
        pixels = torch.randn(int(grid.prod()), patch_dim, generator=generator)
        tokens = [start] + [image] * (int(grid.prod()) // _QWEN_MERGE**2) + [end]
        return tokens, {"pixel_values": pixels, "image_grid_thw": grid}
    if family == "idefics3":
        # Idefics3Processor without image splitting: <fake><global-img><image>*seq_len<fake>
        seq_len = (_IDEFICS3_IMAGE // _IDEFICS3_PATCH) ** 2 // _IDEFICS3_SCALE**2
        pixels = torch.randn(1, 1, 3, _IDEFICS3_IMAGE, _IDEFICS3_IMAGE, generator=generator)
        pixel_mask = torch.ones(1, 1, _IDEFICS3_IMAGE, _IDEFICS3_IMAGE, dtype=torch.long)
        return [end, start] + [image] * seq_len + [end], {"pixel_values": pixels, "pixel_attention_mask": pixel_mask}
    if family == "gemma3":
        pixels = torch.randn(1, 3, _GEMMA3_IMAGE, _GEMMA3_IMAGE, generator=generator)
        return [start] + [image] * config.mm_tokens_per_image + [end], {"pixel_values": pixels}
    raise ValueError(f"family {family!r} takes no images")


def make_inputs(
    family: str,
    model: PreTrainedModel,
    *,
    with_image: bool,
    batch_size: int = 1,
    seed: int = 0,
    prompt_len: int = 7,
) -> dict[str, torch.Tensor]:
    """
    Build processor-shaped inputs for a tiny model of `family`, for `model(**inputs)` and `model.generate(**inputs)`.

    Row `r` holds `prompt_len + 3 * r` random text tokens (and, for the families whose tokenizer adds one, a leading
    bos); with `with_image=True` it also holds one image, inserted after the first two text tokens with the family's
    placeholder block. Llava-NeXT and Qwen rows alternate between two image sizes, so their placeholder counts differ
    from row to row. Each row is drawn from its own generator seeded with `(seed, r)`: row 0 of a batch equals the
    `batch_size=1` inputs of the same seed. Rows are left-padded with `pad_token_id` to a common length.

    Keys per family (as the processors return them):

    - all: `input_ids`, `attention_mask`;
    - llava: `pixel_values (B, 3, 24, 24)`;
    - llava_next: `pixel_values (B, max_crops, 3, 16, 16)` zero-padded over crops, `image_sizes (B, 2)`;
    - qwen2_vl / qwen2_5_vl: `mm_token_type_ids` (always), flattened `pixel_values (sum t*h*w, 96)`,
      `image_grid_thw (B, 3)`;
    - idefics3: `pixel_values (B, 1, 3, 32, 32)`, `pixel_attention_mask (B, 1, 32, 32)`;
    - gemma3: `token_type_ids` (always), `pixel_values (B, 3, 16, 16)`.

    Args:
        family (`str`):
            One of [`FAMILIES`].
        model ([`~transformers.PreTrainedModel`]):
            A model from [`build_tiny_target`]; its config gives the vocabulary size and pixel dtype.
        with_image (`bool`):
            Whether every row gets an image. Must be `False` for text-only families.
        batch_size (`int`, *optional*, defaults to 1):
            Number of rows.
        seed (`int`, *optional*, defaults to 0):
            Seed for the text tokens and the pixels.
        prompt_len (`int`, *optional*, defaults to 7):
            Number of random text tokens in row 0.

    Returns:
        `dict[str, torch.Tensor]`: the model inputs, on the model's device.
    """
    _check_family(family)
    if with_image and family not in MULTIMODAL_FAMILIES:
        raise ValueError(f"family {family!r} is text-only: with_image must be False")
    if batch_size < 1 or prompt_len < 1:
        raise ValueError(f"batch_size and prompt_len must be positive, got {batch_size} and {prompt_len}")
    config = model.config
    vocab_size = config.get_text_config().vocab_size
    ids = reserved_token_ids(vocab_size)
    adds_bos = family not in ("qwen2_vl", "qwen2_5_vl", "qwen2")

    rows: list[list[int]] = []
    pixels: list[dict[str, torch.Tensor]] = []
    for row in range(batch_size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + row)
        text = _text_tokens(generator, prompt_len + 3 * row, vocab_size)
        tokens = [ids["bos"]] if adds_bos else []
        if with_image:
            block, row_pixels = _image_row(family, config, row, generator)
            tokens += text[:2] + block + text[2:]
            pixels.append(row_pixels)
        else:
            tokens += text
        rows.append(tokens)

    length = max(len(tokens) for tokens in rows)
    input_ids = torch.full((batch_size, length), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, length - len(tokens) :] = torch.tensor(tokens)
        attention_mask[row, length - len(tokens) :] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}

    if family in ("qwen2_vl", "qwen2_5_vl", "gemma3"):
        key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids"
        inputs[key] = (input_ids == ids["image"]).long()
    if with_image:
        if family == "llava_next":
            max_crops = max(p["pixel_values"].shape[1] for p in pixels)
            padded = torch.zeros(batch_size, max_crops, *pixels[0]["pixel_values"].shape[2:])
            for row, row_pixels in enumerate(pixels):
                padded[row, : row_pixels["pixel_values"].shape[1]] = row_pixels["pixel_values"]
            inputs["pixel_values"] = padded
            inputs["image_sizes"] = torch.cat([p["image_sizes"] for p in pixels])
        else:
            for key in pixels[0]:
                inputs[key] = torch.cat([p[key] for p in pixels])
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return {key: value.to(model.device) for key, value in inputs.items()}


def split_rows(family: str, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """
    Split batched inputs from [`make_inputs`] into one unpadded `batch_size=1` input dict per row.

    Each returned dict is what the processor would produce for that row alone (padding removed, Llava-NeXT crops cut
    to the row's own count, Qwen flattened patches cut to the row's image), so generating it must give the same tokens
    as the row of a batched generate.

    Args:
        family (`str`):
            One of [`FAMILIES`].
        inputs (`dict[str, torch.Tensor]`):
            Inputs from [`make_inputs`].

    Returns:
        `list[dict[str, torch.Tensor]]`: one dict per row.
    """
    _check_family(family)
    patch_counts: list[int] = []
    if family in ("qwen2_vl", "qwen2_5_vl") and "image_grid_thw" in inputs:
        patch_counts = inputs["image_grid_thw"].prod(-1).tolist()

    result = []
    for row in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][row].bool()
        single: dict[str, torch.Tensor] = {}
        for key, value in inputs.items():
            if key in _PER_TOKEN_KEYS:
                single[key] = value[row][keep][None]
            elif key == "pixel_values" and patch_counts:
                offset = sum(patch_counts[:row])
                single[key] = value[offset : offset + patch_counts[row]]
            elif key == "pixel_values" and family == "llava_next":
                height, width = inputs["image_sizes"][row].tolist()
                single[key] = value[row : row + 1, : _llava_next_num_crops(height, width)]
            else:
                single[key] = value[row : row + 1]
        result.append(single)
    return result
