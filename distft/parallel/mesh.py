"""One `DeviceMesh` for the FSDP2 family: data-parallel replicate × data-parallel shard × context ×
tensor dimensions, in that order (row-major), so the ranks of one context/tensor group are
neighbours (rank = dp_index × cp × tp + cp_index × tp + tp_index) and a node holds whole groups.

FSDP2 shards parameters over `dp_shard` × `cp` flattened ("dp_shard_cp"), as torchtitan does:
context-parallel ranks hold different tokens of the same examples, so their gradients must be
reduced like data-parallel ones, and sharding over them too saves their parameter memory.
`dp_replicate` > 1 is HSDP (replicas of that sharded group). Tensor-parallel ranks are left out:
their parameters are split by the tensor-parallel plan itself (distft.parallel.tp).

Only data-parallel ranks (dp_replicate × dp_shard) split the global batch: every rank of one
context/tensor group sees the same examples (`dp_rank`).

Expert parallelism (`ep` > 1) is not a dimension of that mesh: the experts of each MoE layer are
split over groups of `ep` neighbouring data-parallel ranks, which exchange their tokens by
all-to-all. The experts get their own mesh over the same ranks (`expert_mesh`: dp_replicate ×
efsdp × ep, as transformers lays it out), FSDP2-sharded over efsdp = dp_shard / ep.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from distft.errors import ConfigError

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """Degrees of the four mesh dimensions; their product is the world size. `ep` splits the
    experts over ranks of one shard group (it is not a factor of the world size)."""

    replicate: int = 1
    shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: those that split the global batch."""
        return self.replicate * self.shard

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp

    def dp_rank(self, rank: int) -> int:
        """This rank's index among the data-parallel ranks (context/tensor ranks share it)."""
        return rank // (self.cp * self.tp)

    def counts_tokens(self, rank: int) -> bool:
        """Whether this rank's batch tokens count toward the job's tokens (tokens/s): every rank
        of a context/tensor group holds the same examples, so only its first rank counts them."""
        return rank % (self.cp * self.tp) == 0


def degrees(strategy_cfg) -> tuple[int, int]:
    """(cp, tp) of a strategy config; strategies without those keys are pure data parallel."""
    return int(getattr(strategy_cfg, "cp", 1) or 1), int(getattr(strategy_cfg, "tp", 1) or 1)


def ep_degree(strategy_cfg) -> int:
    """The expert-parallel degree of a strategy config (1 where it has no `ep`)."""
    return int(getattr(strategy_cfg, "ep", 1) or 1)


def shape_for(world: int, strategy_cfg, replicate: int = 1) -> MeshShape:
    """The mesh of a job of `world` ranks; `replicate` data-parallel replicas (HSDP)."""
    cp, tp = degrees(strategy_cfg)
    check_world(world, cp, tp, replicate)
    shard = world // (cp * tp * replicate)
    ep = ep_degree(strategy_cfg)
    if shard % ep:
        raise ConfigError(
            f"strategy.ep={ep} does not divide the {shard} ranks of a shard group"
            + (f" ({replicate} replicas)" if replicate > 1 else "")
            + "; pick an ep that divides it"
        )
    return MeshShape(replicate, shard, cp, tp, ep)


def check_world(world: int, cp: int, tp: int, replicate: int = 1) -> None:
    inner = cp * tp * replicate
    if world % inner:
        raise ConfigError(
            f"strategy.cp={cp} × strategy.tp={tp}"
            + (f" × {replicate} replicas" if replicate > 1 else "")
            + f" = {inner} does not divide the world size {world}; pick degrees whose product divides it"
        )


def build(device_type: str, shape: MeshShape):
    """The 4-D mesh with named dims, plus the flattened dims "dp" (batch split), "dp_shard_cp"
    (FSDP2 sharding) and "dp_cp" (gradient reduction, HSDP replicas included)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device_type, (shape.replicate, shape.shard, shape.cp, shape.tp), mesh_dim_names=DIMS
    )
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh


def fsdp_mesh(mesh, shape: MeshShape):
    """The (sub-)mesh fully_shard shards over: 1-D dp_shard × cp, or 2-D replicate × that (HSDP)."""
    if shape.replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


@functools.cache
def expert_mesh(device_type: str, shape: MeshShape):
    """The experts' 3-D mesh over the same ranks (dp_replicate, efsdp, ep): neighbouring ranks form
    an ep group; efsdp shards each expert group's weights over its copies. Built once per job."""
    from torch.distributed.device_mesh import init_device_mesh

    efsdp = shape.shard // shape.ep
    return init_device_mesh(
        device_type, (shape.replicate, efsdp, shape.ep), mesh_dim_names=("dp_replicate", "efsdp", "ep")
    )


def experts_fsdp_mesh(mesh, shape: MeshShape):
    """The (sub-)mesh fully_shard shards the experts over: efsdp, or replicate × efsdp (HSDP)."""
    if shape.replicate > 1:
        return mesh["dp_replicate", "efsdp"]
    return mesh["efsdp"]
