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
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.errors import ConfigError

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """Degrees of the four mesh dimensions; their product is the world size."""

    replicate: int = 1
    shard: int = 1
    cp: int = 1
    tp: int = 1

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


def shape_for(world: int, strategy_cfg, replicate: int = 1) -> MeshShape:
    """The mesh of a job of `world` ranks; `replicate` data-parallel replicas (HSDP)."""
    cp, tp = degrees(strategy_cfg)
    check_world(world, cp, tp, replicate)
    return MeshShape(replicate, world // (cp * tp * replicate), cp, tp)


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
