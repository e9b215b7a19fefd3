"""One job per run dir: rank 0 holds an exclusive lock on run_dir/.lock while the job runs.

The lock is `fcntl.flock` on an open file: the kernel drops it when the holding process exits,
however it exits (kill -9 included), so a lock is never stale once its holder is gone and there is
nothing to clean up. The file names the holder (host, pid, start time) for the refusal message.
An elastic or SLURM restart starts after the old ranks are gone, so it takes the lock again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from distft.errors import ConfigError
from distft.runtime import dist

LOCK = ".lock"
_HELD: dict[str, int] = {}  # run dir → open descriptor: this process's locks, held until it exits


def _try_lock(run_dir: Path) -> str | None:
    """Take the lock (rank 0); None when taken, else the refusal message."""
    key = str(run_dir)
    if key in _HELD:  # this process holds it already (a second build in the same process)
        return None
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        return (
            f"output_dir={run_dir} is in use by another run (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {when}): two runs in one run dir would overwrite each "
            "other's checkpoints and metrics. Wait for it to end, stop it, or pick another output_dir"
        )
    os.ftruncate(fd, 0)
    os.write(
        fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
    )
    _HELD[key] = fd
    return None


def acquire(run_dir: Path, info) -> None:
    """Rank 0 locks run_dir (it exists); every rank raises the refusal. A collective."""
    error = _try_lock(run_dir) if info.is_main else None
    error = dist.broadcast_object(error)
    if error:
        raise ConfigError(error)


def release(run_dir: Path) -> None:
    """Drop this process's lock on run_dir early (process exit drops it anyway)."""
    fd = _HELD.pop(str(run_dir), None)
    if fd is not None:
        os.close(fd)
