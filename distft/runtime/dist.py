"""Process-group setup and the few collectives the engine needs (works as a single process too)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init(timeout_s: int = 600) -> DistInfo:
    """Join the process group from torchrun / deepspeed / srun variables; gloo on CPU, nccl on GPU."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if gpu else None,
            **_restart_store(rank, world, timeout),
        )
    if not gpu:
        # Ranks share the host's cores: one thread each unless the user says otherwise.
        threads = os.environ.get("OMP_NUM_THREADS")
        per_rank = max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(int(threads) if threads else per_rank)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def _restart_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun the workers share the agent's store, which outlives an elastic restart: the
    process group's keys of the failed attempt (a dead rank's gloo address) would still be there
    and the restarted ranks could connect to it and fail. One key prefix per attempt avoids that."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"distft/attempt_{attempt}", store), "rank": rank, "world_size": world}


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
