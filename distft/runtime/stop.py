"""Graceful stop on request: a signal sets a flag, the ranks agree on it at the next step end,
write a checkpoint and exit with EXIT_CODE; a restart with resume=auto continues from it.

SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@N`, forwarded by the batch script
through torchrun, which passes handled signals on to its workers)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from distft.runtime import dist

SIGNALS = (signal.SIGUSR1,)
EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to continue

_requested = False


class StopRequested(Exception):
    """Raised by the loop after the stop checkpoint; entry points exit with EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step} after writing its checkpoint")
        self.step = step


def _handler(signum: int, frame) -> None:
    global _requested
    if not _requested and os.environ.get("RANK", "0") == "0":  # every rank gets it: say it once
        print(
            f"distft: got {signal.Signals(signum).name}: checkpoint at the next step end, then stop",
            file=sys.stderr,
            flush=True,
        )
    _requested = True


def install() -> None:
    """Catch the stop signals (main thread only: Python delivers signals there)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


def requested() -> bool:
    return _requested


def agreed(device) -> bool:
    """True on every rank when any rank got a stop signal: one tiny all-reduce per step, so all
    ranks leave the loop after the same step."""
    (n,) = dist.all_reduce_sum([1.0 if _requested else 0.0], device)
    return n > 0
