"""cluster=local: this node's ranks through torch's elastic launch (torchrun).

Also the per-node launcher inside a SLURM job (`python -m launch.local <overrides>`, started by
srun once per node): there the nodes, this node's rank, the rendezvous host (the job's first
node) and a per-job port come from SLURM's variables.

The ranks get plain Hydra overrides on their command line; nothing here parses sys.argv with
Hydra's app machinery, so torch.distributed and Hydra never compete for it.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from distft.runtime.dist import slurm_hostnames, slurm_port
from launch import supervise

# torchrun passes the signals it handles on to its workers, which checkpoint and stop
# (distft.runtime.stop). Given as --signals-to-handle: torch 2.13 overwrites the
# TORCHELASTIC_SIGNALS_TO_HANDLE variable from that flag's default, which lacks SIGUSR1.
STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class RendezvousUnreachable(Exception):
    pass


def nproc_per_node(c) -> int:
    """cluster.nproc_per_node, or one rank per GPU when it is 0 (1 without GPUs)."""
    if c.nproc_per_node > 0:
        return min(c.nproc_per_node, c.gpus_per_node) if c.gpus_per_node > 0 else c.nproc_per_node
    if c.gpus_per_node > 0:
        return c.gpus_per_node
    import torch

    return max(1, torch.cuda.device_count())


def command(c, overrides: list[str], run_id: str = "distft") -> list[str]:
    """The torchrun command for this node (c: the cluster config, already placed on a node)."""
    rdzv_conf = [f"join_timeout={c.rdzv_timeout_s}", f"read_timeout={max(60, c.rdzv_timeout_s)}"]
    if c.nodes > 1:
        # Several launchers may share one host (tests); the first node hosts the store.
        rdzv_conf.append(f"is_host={int(c.node_rank == 0)}")
    return [
        sys.executable,
        "-m",
        "launch.torchrun",  # torch.distributed.run, one line instead of a traceback on a stop
        f"--nnodes={c.nodes}",
        f"--nproc-per-node={nproc_per_node(c)}",
        f"--node-rank={c.node_rank}",
        f"--max-restarts={c.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={c.master_addr}:{c.master_port}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={','.join(rdzv_conf)}",
        f"--shutdown-timeout={c.stop_grace_s}",
        f"--signals-to-handle={STOP_SIGNALS}",
        "-m",
        "distft.train",
        *overrides,
    ]


def environment(c, run_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if c.network_interface:  # the NIC between nodes, for NCCL and gloo
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = c.network_interface
    if c.gpus_per_node > 0 and run_dir is not None:
        # NCCL's watchdog: on a collective timeout, dump the flight recorder next to the stacks.
        env.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        env.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir / "stacks" / "nccl_trace_rank_"))
    return env


def wait_for_endpoint(host: str, port: int, timeout_s: float) -> None:
    """A non-first node checks that the rendezvous host:port answers before torchrun starts, so
    an unreachable first node fails within the timeout with the address it tried."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise RendezvousUnreachable(
                f"cannot reach the rendezvous at {host}:{port} within {timeout_s:.0f} s ({last}). "
                "Is the first node's launcher running, and is the port open between nodes? "
                "(cluster.master_addr, cluster.master_port, cluster.rdzv_timeout_s)"
            )
        time.sleep(0.5)


def run_node(c, overrides: list[str], run_dir: Path | None, dry_run: bool, run_id: str = "distft") -> int:
    cmd = command(c, overrides, run_id)
    print(f"distft-launch: node {c.node_rank}/{c.nodes}:", shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if c.nodes > 1 and c.node_rank > 0:
        try:
            wait_for_endpoint(c.master_addr, c.master_port, c.rdzv_timeout_s)
        except RendezvousUnreachable as e:
            print(f"distft-launch: error: {e}", file=sys.stderr, flush=True)
            return 3
    return supervise.run(cmd, environment(c, run_dir), c.stop_grace_s)


def run(cfg, overrides: list[str], dry_run: bool) -> int:
    return run_node(cfg.cluster, overrides, Path(cfg.output_dir), dry_run)


# ---------------------------------------------------------------------- inside a SLURM job
def slurm_node(c, env: dict[str, str] | None = None, hostnames=slurm_hostnames):
    """The cluster config placed on this SLURM node: nodes, node rank, first node, job port."""
    env = os.environ if env is None else env
    job = int(env["SLURM_JOB_ID"])
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname()
    first = hostnames(nodelist)[0]
    return replace(
        c,
        nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
        node_rank=int(env.get("SLURM_NODEID", 0)),
        master_addr=first,
        master_port=slurm_port(c.master_port, job),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.local <overrides>`: one node's launcher (srun starts one per node)."""
    from distft.config.load import load_config
    from distft.errors import DistftError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = load_config(argv)
    except DistftError as e:
        print(f"distft-launch: error: {e}", file=sys.stderr)
        return 2
    c = cfg.cluster
    overrides = list(argv)
    run_id = "distft"
    if "SLURM_JOB_ID" in os.environ:
        c = slurm_node(c)
        run_id = f"slurm-{os.environ['SLURM_JOB_ID']}"
        if not cfg.output_dir:
            # By hand (`sbatch slurm/train.sbatch ...`): one run dir per job, kept across requeues.
            submit = os.environ.get("SLURM_SUBMIT_DIR", os.getcwd())
            cfg.output_dir = str(Path(submit) / "outputs" / run_id)
            overrides.append(f"output_dir={cfg.output_dir}")
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    return run_node(c, overrides, run_dir, bool(cfg.launch.get("dry_run")), run_id)


if __name__ == "__main__":
    sys.exit(main())
