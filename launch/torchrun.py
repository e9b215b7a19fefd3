"""torchrun as distft's launchers run it: `python -m launch.torchrun <torchrun args>`.

The same agent (torch.distributed.run.main), with two things said in one line instead of a page:
a stop signal (torchrun passes it to the ranks, waits up to --shutdown-timeout for their stop
checkpoint, then raises SignalException) and failed ranks (ChildFailedError's table). The ranks'
own messages, and distft-launch's summary of them, carry the detail.
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


class _QuietStop(logging.Filter):
    """Drop the agent's per-worker shutdown chatter; the ranks say what they do on a stop."""

    NOISE = ("death signal, shutting down workers", "Sending process", "closing signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.NOISE)


def _once(handler):
    """torchrun's handler raises SignalException on every signal; a second one (srun signals every
    process of the step, and the node launcher forwards the same signal) would abort its wait for
    the ranks' stop checkpoint. The first starts the shutdown; later ones are ignored."""
    seen: list[int] = []

    def handle(signum, frame):
        if seen:
            return
        seen.append(signum)
        handler(signum, frame)

    return handle


def main(argv: list[str] | None = None) -> int:
    import torch.distributed.elastic.multiprocessing.api as mp_api
    from torch.distributed.run import main as torchrun_main

    if hasattr(mp_api, "_terminate_process_handler"):  # looked up when the workers start
        mp_api._terminate_process_handler = _once(mp_api._terminate_process_handler)

    for name in ("agent.server.api", "multiprocessing.api"):
        logging.getLogger(f"torch.distributed.elastic.{name}").addFilter(_QuietStop())
    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        for rank, f in sorted(e.failures.items()):
            code = f.exitcode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            print(f"torchrun: rank {rank} (pid {f.pid}) ended with {how}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
