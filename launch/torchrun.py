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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun_main

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
