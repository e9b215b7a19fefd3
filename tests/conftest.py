"""Shared fixtures: the tiny default model directory, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default `model=tiny` (random init, its character tokenizer) as a Hugging Face directory."""
    from distft.config.load import load_config
    from distft.models.tiny import build_tiny

    return Path(build_tiny(tmp_path_factory.mktemp("tiny") / "base", load_config([])[0].model))
