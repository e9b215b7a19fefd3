"""Work that rank 0 does alone (writing an export, converting a checkpoint, saving a model) while
the other ranks wait for it on a key of the process group's store, with no collective pending: a
collective would time out (cluster.timeout_s, NCCL's watchdog) however legitimately slow rank 0
is. A failure on rank 0 is raised on every rank; if rank 0 dies, its store goes away and the
waiting ranks' check() raises.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from torch import distributed as tdist

from distft.errors import DistftError
from distft.runtime import dist

_CALLS: Counter = Counter()  # calls per name in this process: every rank makes the same ones
T = TypeVar("T")


def on_rank0(name: str, work: Callable[[], T], is_main: bool, poll_s: float = 0.5) -> T | None:
    """`work()` on rank 0 (its result; None elsewhere), the others waiting on a store key."""
    _CALLS[name] += 1
    key = f"distft/rank0/{name}/{_CALLS[name]}"
    if not is_main:
        wait(key, poll_s)
        return None
    try:
        out = work()
    except BaseException as e:
        signal(key, f"rank 0 failed ({name}): {e}")
        raise
    signal(key, "ok")
    return out


def signal(key: str, value: str) -> None:
    if dist.active():
        tdist.distributed_c10d._get_default_store().set(key, value)


def wait(key: str, poll_s: float = 0.5) -> None:
    """Wait for `key` outside any collective, however long it takes; raise rank 0's failure."""
    if not dist.active():
        return
    store = tdist.distributed_c10d._get_default_store()
    while not store.check([key]):
        time.sleep(poll_s)
    status = store.get(key).decode()
    if status != "ok":
        raise DistftError(status)
