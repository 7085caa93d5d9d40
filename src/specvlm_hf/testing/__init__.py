"""Test helpers: tiny random target models of every supported family and processor-shaped inputs for them."""

from __future__ import annotations

from .tiny_models import (
    FAMILIES,
    MULTIMODAL_FAMILIES,
    TEXT_FAMILIES,
    build_tiny_target,
    make_inputs,
    reserved_token_ids,
    split_rows,
)

__all__ = [
    "FAMILIES",
    "MULTIMODAL_FAMILIES",
    "TEXT_FAMILIES",
    "build_tiny_target",
    "make_inputs",
    "reserved_token_ids",
    "split_rows",
]
