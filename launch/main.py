"""`distft-launch [overrides]`: validate the config once, then start the whole job from cluster=."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from distft.errors import DistftError

LAUNCHERS = {"local": "launch.local"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from distft.config.load import load_config

        cfg, _ = load_config(argv)  # every rule checked before any rank starts
    except DistftError as e:
        print(f"distft-launch: error: {e}", file=sys.stderr)
        return 2
    overrides = [a for a in argv if not a.startswith(("output_dir=", "launch."))]
    out = cfg.output_dir or str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    overrides.append(f"output_dir={Path(out).resolve()}")
    import importlib

    launcher = importlib.import_module(LAUNCHERS[cfg.cluster.name])
    return launcher.run(cfg, overrides, bool(cfg.launch.get("dry_run")))


if __name__ == "__main__":
    sys.exit(main())
