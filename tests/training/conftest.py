"""Fixtures for the training tests: a tiny Llava target with its processor and a directory of images."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf.testing import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor

from .training_helpers import write_images


@pytest.fixture(scope="session")
def processor():
    return build_tiny_processor("llava")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root)
    return root


@pytest.fixture
def target():
    return build_tiny_target("llava", seed=0)


@pytest.fixture
def draft(target):
    torch.manual_seed(1)
    return specvlm_hf.SpecVLMDraftModel.from_target(target)
