"""The one builder of frozen models beside the policy (a reference, a teacher, a reward model):
loaded like the policy, gradients off, then placed by the run's strategy
(`Strategy.place_frozen`): sharded where the strategy shards parameters (FSDP2's plan, an
optimizer-free ZeRO-3 engine), a replica on each rank otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from distft.models import load_model


def frozen_loader(cfg, info, strategy) -> Callable[..., torch.nn.Module]:
    """`load(path, auto_class=None, dtype=torch.float32)` for this run's strategy."""

    def load(path: str, auto_class=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        model = load_model(path, cfg, dtype, {}, auto_class)
        model.config.use_cache = False
        model.requires_grad_(False)
        return strategy.place_frozen(model)

    return load
