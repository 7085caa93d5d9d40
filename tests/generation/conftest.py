"""Shared fixtures of the decoding-loop tests."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.testing.tiny_models import build_tiny_target


@pytest.fixture(scope="module")
def targets():
    """`targets(family) -> (tiny target, untrained draft)`, built once per test module."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            target = build_tiny_target(family)
            torch.manual_seed(1)
            cache[family] = (target, SpecVLMDraftModel.from_target(target))
        return cache[family]

    return get
