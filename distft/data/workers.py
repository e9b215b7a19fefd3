"""How many worker processes prepare data: data.num_proc, or for auto the CPUs this process may run
on (at most MAX_AUTO). While one rank prepares, the other ranks of its node wait for it, so their
cores are free; on a 2-rank, 2-core node auto halves the cleaning and encoding of a few thousand
rows before the first step. Workers are forked only when there are at least two batches or chunks."""

from __future__ import annotations

import os

MAX_AUTO = 8  # beyond this, reading and writing in the main process is the limit


def count(data_cfg) -> int:
    n = getattr(data_cfg, "num_proc", 1)
    if n != "auto":
        return int(n)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_AUTO))
