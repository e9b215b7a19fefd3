"""The context generate calls run in (distft.models.generation.generation_mode) on one process, and
where async checkpoints are staged (distft.strategies.staging)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.quick
def test_ddp_generation_runs_in_the_compute_dtype(tmp_path):
    """fp32 weights (DDP keeps them and autocasts in training) generate under autocast in bf16;
    in fp32 nothing changes."""
    from distft.config.load import load_config
    from distft.models.generation import generation_mode
    from distft.models.loader import load_model
    from distft.models.tiny import build_tiny

    cfg = load_config([])[0]
    model = load_model(str(build_tiny(tmp_path / "m", cfg.model)), cfg, torch.float32, {})
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), generation_mode(model, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    with torch.no_grad(), generation_mode(model, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
        assert model(input_ids=ids).logits.dtype == torch.float32
    with generation_mode(model.to(torch.bfloat16), torch.bfloat16):  # weights already in bf16
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.quick
def test_async_checkpoints_stage_into_pinned_memory_on_gpu():
    from distft.strategies.staging import staging_options

    gpu = staging_options(torch.device("cuda", 0))
    assert gpu.use_pinned_memory and gpu.use_non_blocking_copy
    assert not gpu.use_async_staging  # the next optimizer step must not overwrite what is staged
    cpu = staging_options(torch.device("cpu"))
    assert not cpu.use_pinned_memory and not cpu.use_non_blocking_copy
