"""One rank's entry: `python -m distft.train [overrides]` (alone, under torchrun, deepspeed or srun)."""

from __future__ import annotations

import os
import sys

from distft.errors import DistftError
from distft.runtime.stop import EXIT_CODE as STOP_EXIT_CODE
from distft.runtime.stop import StopRequested


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
    try:
        from distft.config.load import load_config

        cfg, composed = load_config(argv)
        from distft.engine.trainer import Trainer

        Trainer.build(cfg, composed).train()
    except DistftError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"distft: error: {e}", file=sys.stderr, flush=True)
        return 2
    except StopRequested as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"distft: {e}; resume=auto continues from it", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    finally:
        from distft.runtime import dist

        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
