"""How many worker processes prepare data: data.num_proc, or for auto the CPUs this process may run
on (at most MAX_AUTO). While one rank prepares, the other ranks of its node wait for it, so their
cores are free; on a 2-rank, 2-core node auto halves the cleaning and encoding of a few thousand
rows before the first step. Workers are forked only when there are at least two batches or chunks."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator

MAX_AUTO = 8  # beyond this, reading and writing in the main process is the limit


def count(data_cfg) -> int:
    n = getattr(data_cfg, "num_proc", 1)
    if n != "auto":
        return int(n)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_AUTO))


@contextlib.contextmanager
def forked_pool(num_proc: int, init: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """A Pool of forked workers that ends with close and join: every task it was given finishes
    (also when the caller stops early on an error), then the workers exit. Pool's own exit
    terminates the workers while its task thread may still be handing them work, and that can
    hang the process (seen in the test suite)."""
    pool = mp.get_context("fork").Pool(num_proc, initializer=init, initargs=initargs)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()
