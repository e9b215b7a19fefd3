"""`distft-launch -m ...`: a Hydra multirun where every trial is a whole multi-rank job.

Only this launcher process runs Hydra's app (sweeper + launcher plugins); each trial's ranks are
started with the trial's plain overrides, so Hydra and torch.distributed never share a sys.argv.

- default launcher: trials run one after another on this machine (cluster=local: torchrun;
  cluster=slurm: one batch job each, waited for).
- `hydra/launcher=submitit_slurm`: each trial is its own SLURM job whose tasks are the ranks
  (tasks_per_node = cluster.nproc_per_node); they form one process group from SLURM's variables.
- `hydra/sweeper=optuna`: the trial's final eval loss is the objective.

Every trial gets a run dir under the sweep dir and a `trial.json`; a failed trial is recorded
and the sweep goes on. At the end `summary.md` / `summary.json` list trial, overrides, final
eval loss and status.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from distft.config import resolvers  # noqa: F401  (trials resolve the YAML's ${distft_...:})
from distft.paths import conf_dir
from distft.runtime.stop import EXIT_CODE as STOP_EXIT_CODE

# Launcher-side keys a trial does not pass to its ranks (it sets output_dir itself).
LAUNCH_ONLY = ("output_dir=", "launch.")
# hydra/launcher=submitit_slurm: resources from the trial's cluster config unless given.
SUBMITIT_DEFAULTS = {
    "hydra.launcher.nodes": "${cluster.nodes}",
    "hydra.launcher.tasks_per_node": "${cluster.nproc_per_node}",
    # Quoted: Hydra's override grammar takes a nested interpolation only as a string.
    "hydra.launcher.gpus_per_node": "'${distft_none_if_zero:${cluster.gpus_per_node}}'",  # CPU: no GRES
    "hydra.launcher.cpus_per_task": "1",
    "hydra.launcher.timeout_min": "60",
}


def _has(argv: list[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+~") == key for a in argv)


def main(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("-m", "--multirun")]
    extra = []
    sweep_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")), None)
    if sweep_dir is None:
        sweep_dir = str(Path("multirun") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
    sweep_dir = str(Path(sweep_dir).resolve())
    extra.append(f"hydra.sweep.dir={sweep_dir}")
    if not _has(args, "hydra.job.name"):
        extra.append("hydra.job.name=distft")
    if "hydra/launcher=submitit_slurm" in args:
        extra += [f"{k}={v}" for k, v in SUBMITIT_DEFAULTS.items() if not _has(args, k)]
    # Trials are named after the keys the sweep varies (read back in each trial, local or SLURM).
    os.environ["DISTFT_SWEEP_KEYS"] = ",".join(sweep_keys(args))
    saved = sys.argv
    sys.argv = [saved[0], "-m", *args, *extra]
    rc = 0
    try:
        _app()
    except SystemExit as e:  # Hydra reports its own errors and exits; the summary still gets written
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    rows = write_summary(Path(sweep_dir))
    if rc == 0 and rows and all(r["status"] != "ok" for r in rows):
        rc = 1
    return rc


def sweep_keys(args: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # Hydra reports malformed overrides itself
        return []
    return [
        o.key_or_group for o in parsed if o.is_sweep_override() and not o.key_or_group.startswith("hydra")
    ]


def trial_name(task_overrides: list[str], fallback: str) -> str:
    """The trial's values of the swept keys, e.g. `train.lr=0.0003,tuning.r=16`."""
    keys = [k for k in os.environ.get("DISTFT_SWEEP_KEYS", "").split(",") if k]
    picked = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    return ",".join(picked) or fallback


def _hydra_main():
    import hydra

    return hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")


def _app():
    return _hydra_main()(trial)()


# ---------------------------------------------------------------------------------- one trial
def _quote(value: str) -> str:
    return "'" + value.replace("\\", "").replace("'", "") + "'"


def trial_overrides(hc) -> tuple[list[str], Path]:
    """The ranks' plain overrides for this trial, and its run dir."""
    overrides = [o for o in hc.overrides.task if not o.startswith(LAUNCH_ONLY)]
    run_dir = Path(hc.runtime.output_dir).resolve()
    sweep = Path(hc.sweep.dir)
    if not any(o.startswith("logger.group=") for o in overrides):
        overrides.append(f"logger.group={_quote('sweep-' + '_'.join(sweep.parts[-2:]))}")
    if not any(o.startswith("logger.run_name=") for o in overrides):
        name = trial_name(list(hc.overrides.task), hc.job.override_dirname or f"trial-{hc.job.num}")
        overrides.append(f"logger.run_name={_quote(name)}")
    return [*overrides, f"output_dir={run_dir}"], run_dir


def _validate(overrides: list[str]):
    """Typed config of the trial, composed without disturbing the running Hydra app's state."""
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from distft.config.load import load_config

    backup = get_gh_backup()
    try:
        return load_config(overrides)[0]
    finally:
        restore_gh_from_backup(backup)


def trial(_cfg) -> float | None:
    """Hydra's task function: run the trial as a whole job, record it, return its eval loss."""
    from hydra.core.hydra_config import HydraConfig

    from distft.errors import DistftError

    hc = HydraConfig.get()
    overrides, run_dir = trial_overrides(hc)
    record = {
        "trial": int(hc.job.num),
        "name": trial_name(list(hc.overrides.task), hc.job.override_dirname),
        "overrides": list(hc.overrides.task),
        "run_dir": str(run_dir),
        "status": "running",
        "eval_loss": None,
    }
    in_slurm_task = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    is_writer = not in_slurm_task or os.environ.get("SLURM_PROCID", "0") == "0"
    start = time.monotonic()
    try:
        cfg = _validate(overrides)
        if in_slurm_task:
            record["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
            rc = _run_rank(overrides)
        else:
            import importlib

            from launch import LAUNCHERS

            launcher = importlib.import_module(LAUNCHERS[cfg.cluster.name])
            cfg.launch["wait"] = True  # cluster=slurm: one batch job per trial, waited for
            rc = launcher.run(cfg, overrides, False)
        record["returncode"] = rc
        record["status"] = {0: "ok", STOP_EXIT_CODE: "stopped"}.get(rc, f"failed (exit {rc})")
    except DistftError as e:
        record["status"] = f"config error: {e}"
    except Exception as e:  # one trial's failure must not end the sweep
        record["status"] = f"failed ({type(e).__name__}: {e})"
    record["seconds"] = round(time.monotonic() - start, 1)
    summary = run_dir / "summary.json"
    if record["status"] == "ok" and summary.is_file():
        loss = json.loads(summary.read_text()).get("eval/loss")
        record["eval_loss"] = loss if isinstance(loss, (int, float)) and math.isfinite(loss) else None
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "trial.json").write_text(json.dumps(record, indent=2))
        print(
            f"distft-launch: trial {record['trial']} {record['status']} eval/loss={record['eval_loss']}",
            flush=True,
        )
    # Optuna's objective; None marks a failed trial (it is recorded as failed and the study goes on).
    return record["eval_loss"]


def _run_rank(overrides: list[str]) -> int:
    """Inside a submitit SLURM task: this task is one rank of the trial's process group."""
    import submitit

    # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first node), MASTER_PORT (from the job id).
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return subprocess.call([sys.executable, "-m", "distft.train", *overrides])


# ---------------------------------------------------------------------------------- summary
def write_summary(sweep_dir: Path) -> list[dict]:
    """Collect every trial's trial.json (a trial dir without one: its job died) into a table."""
    from omegaconf import OmegaConf

    rows = []
    trial_dirs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    for d in trial_dirs:
        path = d / "trial.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        ov_file = d / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(ov_file)) if ov_file.is_file() else []
        rows.append(
            {
                "trial": _num(d.name),
                "overrides": overrides,
                "run_dir": str(d),
                "eval_loss": None,
                "status": "failed (no result: the job died)",
            }
        )
    rows.sort(key=lambda r: r["trial"])
    if not rows:
        return rows
    table = ["| trial | overrides | final eval loss | status |", "|---|---|---|---|"]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if isinstance(r.get("eval_loss"), float) else "-"
        shown = r.get("name") or " ".join(r["overrides"])
        table.append(f"| {r['trial']} | {shown} | {loss} | {r['status']} |")
    (sweep_dir / "summary.md").write_text("\n".join(table) + "\n")
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\ndistft sweep summary ({sweep_dir})\n" + "\n".join(table), flush=True)
    return rows


def _num(name: str) -> int:
    return int(name) if name.isdigit() else -1
