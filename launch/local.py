"""cluster=local: the ranks on this machine through torch's elastic launch (torchrun)."""

from __future__ import annotations

import shlex
import subprocess
import sys


def command(cfg, overrides: list[str]) -> list[str]:
    c = cfg.cluster
    nproc = c.nproc_per_node
    if c.gpus_per_node > 0:
        nproc = min(nproc, c.gpus_per_node) if nproc else c.gpus_per_node
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={c.nodes}",
        f"--max-restarts={c.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{c.master_port}",
        "-m",
        "distft.train",
        *overrides,
    ]


def run(cfg, overrides: list[str], dry_run: bool) -> int:
    cmd = command(cfg, overrides)
    print("distft-launch:", shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    return subprocess.call(cmd)
