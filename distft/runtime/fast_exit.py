"""End a finished rank without the interpreter's teardown.

When `python -m distft.train` returns, CPython tears down every module and object of the torch /
transformers / DeepSpeed stack before the process ends: 2-7 seconds on a loaded 2-core machine,
paid by every rank of every job (and every test that runs one), after all the work is done and the
run dir is complete. `exit_now` does what that teardown does that anyone can observe, then ends the
process at once (os._exit):
- threading's exit hooks, then waits for non-daemon threads, as the interpreter does first;
- runs the atexit handlers (logging's flush and close, W&B, wrappers such as bench/rss.py);
- flushes every still-open writable file object, which the teardown would flush when it
  collected them (the engine closes its own files; this is for anyone else's);
- flushes stdout and stderr.
DISTFT_SLOW_EXIT=1 keeps the normal interpreter exit (e.g. to look for a leak at teardown).
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import threading


def exit_now(code: int) -> None:
    if os.environ.get("DISTFT_SLOW_EXIT") == "1":
        sys.exit(code)
    # The interpreter's own first step of exiting: threading's exit hooks (e.g. concurrent.futures
    # tells its idle pool workers to stop), then every non-daemon thread joined. Joining first
    # would wait forever on an executor's idle worker.
    threading._shutdown()
    atexit._run_exitfuncs()
    flush_open_files()
    os._exit(code)


# The buffered writers; type(obj), not isinstance: isinstance reads `__class__` of every object on
# the heap, and some warn when touched (torch.distributed.reduce_op's FutureWarning).
WRITERS = (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)


def flush_open_files() -> None:
    for obj in gc.get_objects():
        if issubclass(type(obj), WRITERS):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except (OSError, ValueError):  # a broken pipe, a detached buffer
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
