"""Process-group setup and the few collectives the engine needs (works as a single process too)."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
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
    replica_ranks: int = 1
    """Ranks that form one data-parallel replica (tensor-parallel degree): they see the same
    examples; the data-parallel rank is rank // replica_ranks (the mesh's outer dimension)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.replica_ranks

    @property
    def dp_size(self) -> int:
        return self.world_size // self.replica_ranks


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


@dataclass(frozen=True)
class Placement:
    """Where this rank sits, from the launcher's variables or, under `srun python -m distft.train`
    (no launcher), from SLURM's."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def placement(env: Mapping[str, str] | None = None, hostnames=None) -> Placement:
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:  # torchrun, deepspeed, submitit, or alone
        world = int(env.get("WORLD_SIZE", 1))
        return Placement(
            int(env.get("RANK", 0)),
            world,
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    # srun straight into ranks: one task per rank.
    node = int(env.get("SLURM_NODEID", 0))
    per_node = slurm_tasks_per_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    )
    local_world = per_node[node] if node < len(per_node) else int(env.get("SLURM_NTASKS_PER_NODE", 0) or 0)
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", 1))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    first = (hostnames or slurm_hostnames)(nodelist)[0] if nodelist else "127.0.0.1"
    return Placement(
        int(env["SLURM_PROCID"]),
        world,
        int(env.get("SLURM_LOCALID", 0)),
        local_world or world,
        env.get("MASTER_ADDR", first),
        int(env.get("MASTER_PORT") or slurm_port(29500, int(env.get("SLURM_JOB_ID", 0)))),
    )


def slurm_port(base: int, job_id: int) -> int:
    """A port per job (jobs sharing a node do not collide); the same on every node of the job."""
    return base + job_id % 10000


def slurm_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list ('gpu[01-03,07],login1'): `scontrol show hostnames` where it
    exists (it knows every form), else the bracket syntax here (container images may lack it)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def device_for(local_rank: int, gpus_visible: int) -> torch.device:
    """cuda:LOCAL_RANK when the node's GPUs are all visible; with one GPU per task
    (`srun --gpus-per-task=1`, CUDA_VISIBLE_DEVICES narrowed by SLURM) the task's only GPU."""
    if gpus_visible <= 0:
        return torch.device("cpu")
    return torch.device("cuda", local_rank if local_rank < gpus_visible else local_rank % gpus_visible)


def init(timeout_s: int = 600) -> DistInfo:
    """Join the process group from torchrun / deepspeed / srun variables; gloo on CPU, nccl on GPU."""
    p = placement()
    rank, world, local_rank, local_world = p.rank, p.world_size, p.local_rank, p.local_world_size
    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    device = device_for(local_rank, torch.cuda.device_count() if gpu else 0)
    if gpu:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        for name, value in (
            ("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
            ("LOCAL_WORLD_SIZE", local_world), ("MASTER_ADDR", p.master_addr), ("MASTER_PORT", p.master_port),
        ):  # fmt: skip
            os.environ.setdefault(name, str(value))  # DeepSpeed and torch read them too
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


def init_alone(backend: str | None = None) -> None:
    """A one-rank process group on an in-memory store (no port, no MPI) for a process started on
    its own: DeepSpeed needs a process group and, without the launcher variables (RANK, WORLD_SIZE,
    MASTER_ADDR, ...), would look for MPI (mpi4py) to find one."""
    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


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


def shutdown(linger_s: float = 300.0) -> None:
    """Leave the process group. Where rank 0's process hosts the group's store (any launcher but
    torchrun, whose agent hosts it: `deepspeed`, srun, mp.spawn), rank 0 stays until every rank has
    left: a rank still waiting on a store key (on_rank0) would otherwise lose the store
    mid-wait and fail a finished run. Bounded by `linger_s` for ranks that died."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    hosted_here = (
        active() and dist.get_rank() == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    )
    store = dist.distributed_c10d._get_default_store() if active() else None
    world = dist.get_world_size()
    dist.destroy_process_group()
    if store is None:
        return
    try:
        left = store.add("distft/left", 1)
        deadline = time.monotonic() + linger_s
        while hosted_here and left < world and time.monotonic() < deadline:
            time.sleep(0.05)
            left = store.add("distft/left", 0)
    except RuntimeError:  # DistNetworkError, DistStoreError: the host is gone, nothing to wait for
        pass
