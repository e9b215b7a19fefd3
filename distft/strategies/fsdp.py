"""FSDP2: `fully_shard` on every decoder layer, then the root, with a mixed-precision policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.dtypes import PRECISION_DTYPES
from distft.errors import ConfigError
from distft.models.layers import decoder_layers
from distft.parallel import tp as tensor_parallel
from distft.ranges import num
from distft.strategies.memory import States, fully_sharded
from distft.strategies.torch_native import TorchNativeStrategy


@dataclass
class FsdpConfig:
    name: str = "fsdp"
    """Strategy."""
    reshard_after_forward: bool = True
    """Free gathered layer weights after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."""
    tp: int = num(1, ge=1)
    """Tensor-parallel degree: attention and MLP projections sharded over groups of `tp` ranks
    (they see the same examples); FSDP2 shards over the world / tp data-parallel ranks."""


config = FsdpConfig
loads_sharded = True  # the model may come on the meta device; each rank reads only its shards


def validate(cfg, gpu: bool) -> None:
    if cfg.train.precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 is not supported with strategy=fsdp (FSDP2 gradients need a "
            "sharded loss scaler); use train.precision=bf16, or fp16 with strategy=ddp or "
            "zero1/zero2/zero3 on GPU"
        )
    tensor_parallel.validate(cfg)  # [tp]


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    if tuning == "prefix":
        # Checked with 2 ranks against DDP on the same global batch: the prefix encoder lives in
        # the PEFT wrapper, outside the sharded transformer, so its gradients are not reduced
        # across ranks (step-1 grad norm 0.056 vs DDP's 0.043).
        return "the prefix encoder is not sharded with the model"
    return None


def memory(shape, strategy_cfg, job) -> States:
    return fully_sharded(shape, job, max(job.world, 1))


def parallelize(model: torch.nn.Module, cfg, info, mesh=None) -> torch.nn.Module:
    """Shard over all ranks (1-D mesh), or over `mesh` (2-D: replicate × shard is HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None and tensor_parallel.degree(cfg) > 1:  # [tp] tensor-parallel first, FSDP2 over dp
        mesh = tensor_parallel.parallelize(model, cfg, info)
    if mesh is None:
        mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = None
    if cfg.train.precision != "fp32":
        mp = MixedPrecisionPolicy(
            param_dtype=PRECISION_DTYPES[cfg.train.precision], reduce_dtype=torch.float32
        )
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.strategy.reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    # The root is the transformers model itself, not a PEFT wrapper: generate() is called on it
    # directly, and its forward hooks must gather the embedding and head.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in decoder_layers(root):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return model


def make(cfg, info) -> TorchNativeStrategy:
    # The mixed-precision policy casts parameters, so no autocast on top.
    return TorchNativeStrategy(cfg, info, parallelize, sharded=True, autocast=False)
