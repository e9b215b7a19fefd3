"""Graceful stop on request: a signal sets a flag, the ranks agree on it at the next step end,
write a checkpoint and exit with EXIT_CODE; a restart with resume=auto continues from it.

Signals: SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 (SLURM's pre-timeout warning,
`--signal=B:USR1@N`). distft-launch forwards them to torchrun, which passes them on to its
workers (`--signals-to-handle`); srun passes them to its tasks. A rank started by a launcher also
gets SIGTERM when its parent dies (PR_SET_PDEATHSIG), so no rank outlives its launcher, and a rank
that has not finished within the grace period after a stop request dumps its stacks and exits.

When the launcher sets DISTFT_RANK_STATUS_DIR, each rank writes how it ended there
(`rank<N>.json`: stopped at step N, or the `distft: error:` line) so the launcher can exit with
the ranks' code and print their error last, after torchrun's own messages."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from pathlib import Path

from distft.runtime import dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to continue
GRACE_EXIT_CODE = 124  # the stop did not finish within the grace period
STATUS_DIR_ENV = "DISTFT_RANK_STATUS_DIR"
_PR_SET_PDEATHSIG = 1

_requested = False
_grace_s = 120.0
_dump_stacks = None  # set by install(): the pre-flight's stack dump (stop sits below preflight)


class StopRequested(Exception):
    """Raised by the loop after the stop checkpoint; entry points exit with EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step} after writing its checkpoint")
        self.step = step


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _handler(signum: int, frame) -> None:
    global _requested
    if not _requested:
        if _rank() == "0":  # every rank gets it: say it once
            print(
                f"distft: got {signal.Signals(signum).name}: checkpoint at the next step end, then stop",
                file=sys.stderr,
                flush=True,
            )
        if _grace_s > 0:
            timer = threading.Timer(_grace_s, _grace_expired, args=(signal.Signals(signum).name,))
            timer.daemon = True
            timer.start()
    _requested = True


def _grace_expired(name: str) -> None:
    """Still alive stop_grace_s after the stop signal (a peer died, a step or save hangs): leave
    a stack dump to say where, then exit rather than linger without a launcher."""
    if _dump_stacks is not None:
        _dump_stacks(f"Stop: still running {_grace_s:.0f} s after {name} (cluster.stop_grace_s)")
    print(
        f"distft: rank {_rank()}: not stopped within cluster.stop_grace_s={_grace_s:.0f} s after {name}; "
        "exiting without a new checkpoint (stacks in <run dir>/stacks/)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(GRACE_EXIT_CODE)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def started_by_launcher() -> bool:
    """torchrun, the deepspeed launcher or srun started this rank (not a user's shell, where the
    run must survive e.g. `nohup`). Read at import: a process alone sets LOCAL_RANK itself later."""
    return _LAUNCHED


_LAUNCHED = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_STEP_ID"))


def install(grace_s: float | None = None, dump_stacks=None) -> None:
    """Catch the stop signals (main thread only: Python delivers signals there); under a launcher,
    also stop when the parent dies. `dump_stacks(title)` runs when the grace period expires."""
    global _grace_s, _dump_stacks
    if grace_s is not None:
        _grace_s = float(grace_s)
    if dump_stacks is not None:
        _dump_stacks = dump_stacks
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)
    if started_by_launcher():
        set_parent_death_signal(signal.SIGTERM)


def requested() -> bool:
    return _requested


def agreed(device) -> bool:
    """True on every rank when any rank got a stop signal: one tiny all-reduce per step, so all
    ranks leave the loop after the same step."""
    (n,) = dist.all_reduce_sum([1.0 if _requested else 0.0], device)
    return n > 0


def write_status(status: dict) -> None:
    """Tell the launcher how this rank ended (when it asked: DISTFT_RANK_STATUS_DIR)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    try:
        path = Path(folder) / f"rank{_rank()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": int(_rank()), **status}))
        tmp.replace(path)
    except OSError:
        pass  # the launcher is gone or the folder is not ours: the exit code still says it
