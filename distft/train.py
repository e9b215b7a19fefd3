"""One rank's entry: `python -m distft.train [overrides]` (alone, under torchrun, deepspeed or srun)."""

from __future__ import annotations

import os
import sys

from distft.errors import DistftError
from distft.runtime import stop
from distft.runtime.stop import EXIT_CODE as STOP_EXIT_CODE
from distft.runtime.stop import StopRequested


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from distft.runtime import quiet

    quiet.install()  # known third-party noise off (DISTFT_VERBOSE=1 shows it), before the imports
    if argv and argv[0] in ("--version", "-V"):
        from distft import __version__

        print(f"distft {__version__}")
        return 0
    from distft.config.cli import early_exit

    if (rc := early_exit("distft-train", __doc__, argv)) is not None:  # --help, --cfg job
        return rc

    stop.install()  # from the start: Ctrl-C while the stack imports is a stop, not a traceback
    try:
        from distft.config.load import load_config

        cfg, composed = load_config(argv)
        from distft.runtime import dist
        from distft.strategies import STRATEGIES, deepspeed_zero

        if STRATEGIES.get(cfg.strategy.name) is deepspeed_zero and dist.placement().world_size == 1:
            dist.init_alone()  # one process, no launcher: DeepSpeed would look for MPI
        from distft.engine.trainer import Trainer

        Trainer.build(cfg, composed).train()
        dist.shutdown()  # rank 0 stays until every rank is done with the store it may host
    except DistftError as e:
        line = f"distft: error: {e}"
        stop.write_status({"status": "error", "message": line})
        if _is_rank0():  # distft-launch prints every rank's line again, last
            print(line, file=sys.stderr, flush=True)
        return 2
    except StopRequested as e:
        stop.write_status({"status": "stopped", "step": e.step})
        if _is_rank0():
            print(f"distft: {e}; resume=auto continues from it", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    finally:
        from distft.runtime import dist

        dist.shutdown(linger_s=0)  # after an error: no waiting on ranks that may be stuck
    return 0


if __name__ == "__main__":
    from distft.runtime.fast_exit import exit_now

    exit_now(main())  # the run is complete: skip the interpreter's seconds-long teardown
