"""Shared fixtures: the tiny default model directory, built once per test session; every test's
environment variables restored after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _environment_restored():
    """A test that sets variables in pytest's own process (MASTER_PORT for an in-process group,
    RANK, ...) must not hand them to later tests' jobs: sbatch, srun and submitit pass the
    environment on (a leaked MASTER_PORT failed three SLURM tests)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default `model=tiny` (random init, its character tokenizer) as a Hugging Face directory."""
    from distft.config.load import load_config
    from distft.models.tiny import build_tiny

    return Path(build_tiny(tmp_path_factory.mktemp("tiny") / "base", load_config([])[0].model))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models run fastest so, and the machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny default model (eval mode) and its tokenizer, loaded in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )
