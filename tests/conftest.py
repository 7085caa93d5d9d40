"""Shared test setup: no Hub access, deterministic CPU threads, and helpers for speculation tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import specvlm_hf  # noqa: E402,F401  (registers Auto classes and the generate route)

# Tiny models run fastest single-threaded (thread start-up dominates their millisecond forwards).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
