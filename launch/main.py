"""`distft-launch [overrides]`: validate the config once, write it into the run dir, then start
the whole job from cluster= (local: torchrun; slurm: a batch job). `-m`: a sweep (launch.sweep).

Launcher-only keys: `launch.dry_run=true` prints what would run; `launch.wait=true` (SLURM)
waits for the batch job and returns its exit code.
"""

from __future__ import annotations

import importlib
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from distft.errors import DistftError
from launch import LAUNCHERS


def rank_overrides(argv: list[str], run_dir: Path) -> list[str]:
    """What the ranks get: the user's overrides without launcher-only keys, plus the run dir."""
    kept = [a for a in argv if not a.startswith(("output_dir=", "launch."))]
    return [*kept, f"output_dir={run_dir}"]


def write_config(composed, run_dir: Path) -> None:
    plain = OmegaConf.to_container(composed, resolve=True)
    plain.pop("hydra", None)
    plain["output_dir"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain), run_dir / "config.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from distft.config.cli import early_exit

    if (rc := early_exit("distft-launch", __doc__, argv, flags="[-m]")) is not None:  # --help, --cfg job
        return rc
    if "-m" in argv or "--multirun" in argv:
        from launch import sweep

        return sweep.main(argv)
    try:
        from distft.config.load import load_config

        cfg, composed = load_config(argv)  # every rule checked before any rank starts
        if cfg.cluster.name not in LAUNCHERS:
            raise DistftError(f"cluster={cfg.cluster.name}: valid: {', '.join(LAUNCHERS)}")
        from launch.checks import before_ranks

        before_ranks(cfg)  # missing data / model paths: here, not under torchrun's failure report
    except DistftError as e:
        print(f"distft-launch: error: {e}", file=sys.stderr)
        return 2
    out = cfg.output_dir or str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir = Path(out).resolve()
    cfg.output_dir = str(run_dir)
    dry_run = bool(cfg.launch.get("dry_run"))
    if not dry_run:
        write_config(composed, run_dir)
    launcher = importlib.import_module(LAUNCHERS[cfg.cluster.name])
    try:
        return launcher.run(cfg, rank_overrides(argv, run_dir), dry_run)
    except DistftError as e:
        print(f"distft-launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
