"""The one builder of frozen models beside the policy (a reference, a teacher, a reward model):
loaded like the policy (sharded where the strategy shards parameters: FSDP2 reads each rank's
shards of a meta-device model, ZeRO-3 partitions at construction; distft.models.sharded_load),
gradients off, then placed by the run's strategy (`Strategy.place_frozen`): sharded with the
policy's plan, an optimizer-free ZeRO-3 engine, or a replica on each rank."""

from __future__ import annotations

from collections.abc import Callable

import torch

from distft.models.sharded_load import load_for


def frozen_loader(cfg, info, strategy) -> Callable[..., torch.nn.Module]:
    """`load(path, auto_class=None, dtype=torch.float32)` for this run's strategy."""

    def load(path: str, auto_class=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        model = load_for(strategy, path, cfg, info, dtype, {}, auto_class)
        model.config.use_cache = False
        model.requires_grad_(False)
        return strategy.place_frozen(model)

    return load
