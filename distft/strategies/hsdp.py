"""HSDP: FSDP2 hybrid sharding over a 2-D mesh (replicate × shard). Parameters are sharded
within a group of `shard_size` ranks (a node by default, where the interconnect is fast) and
replicated across groups, so only gradient all-reduces cross the slower inter-node network."""

from __future__ import annotations

from dataclasses import dataclass

from distft.errors import ConfigError
from distft.parallel import mesh as meshes
from distft.ranges import num
from distft.strategies import fsdp
from distft.strategies.memory import States, fully_sharded
from distft.strategies.torch_native import TorchNativeStrategy


@dataclass
class HsdpConfig(fsdp.MeshDims):
    name: str = "hsdp"
    """Strategy."""
    shard_size: int = num(0, ge=0)
    """Ranks per shard group (0: the ranks of one node). world size / shard_size replicas."""
    reshard_after_forward: bool = True
    """Free gathered layer weights after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."""


config = HsdpConfig
loads_sharded = False
UNVERIFIED = ("ia3", "adapter")  # PEFT modes checked against DDP under fsdp only, not hybrid sharding


def validate(cfg, gpu: bool) -> None:
    fsdp.validate(cfg, gpu)
    if cfg.strategy.shard_size < 0:
        raise ConfigError(f"strategy.shard_size={cfg.strategy.shard_size}: give 0 (one node) or a rank count")


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    if tuning in UNVERIFIED:
        return "not verified under hybrid sharding"
    return fsdp.supports_tuning(tuning, strategy_cfg)


def memory(shape, strategy_cfg, job) -> States:
    """FSDP2's model within a shard group (a node by default); replicas add no states."""
    shard = strategy_cfg.shard_size or job.ranks_per_node or job.world
    return fully_sharded(shape, job, max(min(shard, job.world), 1))


def mesh_shape(cfg, info) -> tuple[int, int]:
    """(replicas, shard group size) for this job; a shard group holds whole cp × tp groups."""
    shard = cfg.strategy.shard_size or info.local_world_size
    if shard <= 0 or info.world_size % shard:
        raise ConfigError(
            f"strategy=hsdp: world size {info.world_size} is not a multiple of the shard group size "
            f"{shard}; set strategy.shard_size to a divisor of the world size"
        )
    cp, tp = meshes.degrees(cfg.strategy)
    if shard % (cp * tp):
        raise ConfigError(
            f"strategy=hsdp: strategy.cp={cp} × strategy.tp={tp} does not divide the shard group size "
            f"{shard}; set strategy.shard_size to a multiple of {cp * tp}"
        )
    return info.world_size // shard, shard


def make(cfg, info) -> TorchNativeStrategy:
    fsdp.check_mesh(cfg, info.device.type == "cuda", info.world_size)
    replicas, _ = mesh_shape(cfg, info)
    shape = meshes.shape_for(info.world_size, cfg.strategy, replicate=replicas)
    return TorchNativeStrategy(cfg, info, fsdp.parallelize, sharded=True, autocast=False, shape=shape)
