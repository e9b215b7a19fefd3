"""Training progress on rank 0: tqdm's bar in a terminal, plain lines when stderr is a file.

A carriage-return bar written to a file (SLURM output, nohup, CI logs) is one line of hundreds of
kilobytes. Without a terminal, one line is printed at the first and last step and otherwise every
tenth of the run or every DISTFT_LOG_INTERVAL_S seconds (default 30), whichever comes first:

    distft: step 40/400 (10%) loss=1.2345 lr=1.00e-03 tok_s=12345 elapsed=0:00:12 eta=0:01:48
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from typing import TextIO

INTERVAL_ENV = "DISTFT_LOG_INTERVAL_S"
LINES_PER_RUN = 10


def progress_bar(total: int, start: int, stream: TextIO | None = None):
    """A tqdm bar on a terminal, else a PlainProgress (both: set_postfix, update, close)."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=stream)
    return PlainProgress(total, start, stream, float(os.environ.get(INTERVAL_ENV, 30)))


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class PlainProgress:
    def __init__(self, total: int, start: int, stream: TextIO, interval_s: float):
        self.total, self.start, self.n = total, start, start
        self.stream, self.interval_s = stream, interval_s
        self.every = max(1, math.ceil((total - start) / LINES_PER_RUN))
        self.t0 = self.last = time.monotonic()
        self.postfix: dict[str, str] = {}

    def set_postfix(self, **values: str) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        first, last = self.n == self.start + n, self.n >= self.total
        if first or last or (self.n - self.start) % self.every == 0 or now - self.last >= self.interval_s:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        done = self.n - self.start
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - self.n) if done else float("nan")
        pct = 100 * self.n // max(self.total, 1)
        values = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (
            f"distft: step {self.n}/{self.total} ({pct}%) {values} "
            f"elapsed={_clock(elapsed)} eta={_clock(eta)}".replace("  ", " ")
        )

    def close(self) -> None:
        pass
