"""DDP: full replicas, gradients all-reduced (averaged) after the last micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.ranges import num
from distft.strategies.memory import States, replicated
from distft.strategies.torch_native import TorchNativeStrategy


@dataclass
class DdpConfig:
    name: str = "ddp"
    """Strategy."""
    bucket_cap_mb: int = num(25, ge=1)
    """Gradient all-reduce bucket size."""


config = DdpConfig
loads_sharded = False


def validate(cfg, gpu: bool) -> None:
    pass


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    return None


def memory(shape, strategy_cfg, job) -> States:
    return replicated(shape, job)


def parallelize(model: torch.nn.Module, cfg, info) -> torch.nn.Module:
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients live in the all-reduce buckets (no second copy); buffers (rotary tables) are the
    # same on every rank by construction: synced once at init, not broadcast every forward.
    return DistributedDataParallel(
        model,
        device_ids=ids,
        bucket_cap_mb=cfg.strategy.bucket_cap_mb,
        gradient_as_bucket_view=True,
        forward_sync_buffers=False,
    )


def make(cfg, info) -> TorchNativeStrategy:
    return TorchNativeStrategy(cfg, info, parallelize, sharded=False, autocast=True)
