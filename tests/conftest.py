"""Shared fixtures: the tiny preset's checkpoint, built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Every test process (and the subprocesses it starts) uses a private cache for built checkpoints.
os.environ.setdefault("PUSA_CACHE_DIR", tempfile.mkdtemp(prefix="pusa-test-cache-"))

from pusa_model.pipeline import model_folder  # noqa: E402
from pusa_model.presets import get_preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    """The tiny checkpoint in diffusers layout (built on first use)."""
    return model_folder(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_folder):
    from pusa_model.pipeline import PusaPipeline

    return PusaPipeline.from_preset("tiny", device="cpu")
