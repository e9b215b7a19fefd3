"""run_info.json: what is needed to reproduce a run (seed, library versions, git commit, hosts).
One entry per start of the run (a resume or an elastic restart appends one). No environment
variables are recorded: they may hold secrets."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from distft.runtime import dist

LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "accelerate", "datasets", "trl", "bitsandbytes")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> dict:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit or None, "dirty": bool(dirty)} if commit else {"commit": None}


def write(cfg, info, run_dir: Path, resumed_from: Path | None) -> None:
    """A collective (gathers every rank's hostname); rank 0 appends to run_dir/run_info.json."""
    hosts = dist.all_gather_objects(socket.gethostname())
    if not info.is_main:
        return
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.train.seed,
        "world_size": info.world_size,
        "hostnames": hosts,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "distft": _version("distft"),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git": _git_commit(),
        "argv": sys.argv[1:],
    }
    path = run_dir / "run_info.json"
    starts = json.loads(path.read_text())["starts"] if path.is_file() else []
    starts.append(entry)
    path.write_text(json.dumps({"starts": starts}, indent=2))
