"""Run a Python module as this rank's program and record its peak RSS when it exits.

`python bench/rss.py <module> [args...]` behaves like `python -m <module> [args...]`; at exit it
writes {"rank": r, "peak_rss_gib": x, "cpu_s": user + system CPU seconds of the process (all its
threads)} to $BENCH_RSS_DIR/rank<r>.json: CPU time depends far less on other jobs' load than
wall time does. Both sides of a comparison
are started through this same wrapper, so the measurement costs them the same.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
from pathlib import Path


def _dump() -> None:
    out = os.environ.get("BENCH_RSS_DIR")
    if not out:
        return
    rank = int(os.environ.get("RANK", "0"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 2**20  # KiB on Linux
    Path(out).mkdir(parents=True, exist_ok=True)
    row = {"rank": rank, "peak_rss_gib": peak, "cpu_s": usage.ru_utime + usage.ru_stime}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    module, args = sys.argv[1], sys.argv[2:]
    atexit.register(_dump)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
