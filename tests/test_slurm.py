"""A real single-node SLURM cluster (slurm/local_cluster.sh: Debian's slurm-wlm + munge, started on
this machine): batch jobs from distft-launch and by hand, preemption + requeue + resume, and a
Hydra submitit sweep where every trial is its own 2-rank SLURM job.

In CI (CI=true) a cluster that cannot start fails these tests; elsewhere they skip, saying why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.util import FAST, REPO, env, metrics, train_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = [*FAST, "data.num_examples=200", "train.eval_generate=false"]
JOB_TIMEOUT = 900
PREEMPT_STEPS = 8


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SLURM tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"no local SLURM cluster: {reason}")


@pytest.fixture(scope="module")
def slurm():
    """Install (if missing) and start the local cluster; idempotent, so cheap when CI did it."""
    if os.geteuid() != 0:
        _unavailable("slurm/local_cluster.sh needs root (apt-get and the daemons)")
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "local_cluster.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        _unavailable(f"slurm/local_cluster.sh failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return True


def slurm_env() -> dict[str, str]:
    e = env()
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"  # the batch job's python
    return e


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------ distft-launch cluster=slurm
@pytest.fixture(scope="module")
def launched(slurm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.main",
            "cluster=slurm",
            "launch.wait=true",
            *TINY,
            "train.max_steps=4",
            f"output_dir={run_dir}",
        ],
        cwd=REPO,
        env=slurm_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    return run_dir, proc


def test_distft_launch_runs_a_two_rank_batch_job_to_completion(launched):
    run_dir, proc = launched
    m = re.search(r"submitted SLURM job (\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    job = m.group(1)
    log = run_dir / f"slurm-{job}.out"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-6000:] if log.exists() else "")
    assert f"tail -f {log}" in proc.stdout  # how to follow it
    assert job_field(job, "JobState") == "COMPLETED"
    assert (run_dir / "train.sbatch").is_file() and (run_dir / "config.yaml").is_file()
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["world_size"] == 2
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (run_dir / "export" / "config.json").is_file()
    assert any("eval/loss" in r for r in metrics(run_dir))
    text = log.read_text()
    assert "--rdzv-backend=c10d" in text and f"--rdzv-id=slurm-{job}" in text


# ------------------------------------------------------------------ by hand + preemption
@pytest.fixture(scope="module")
def preempted(slurm, tmp_path_factory):
    """`sbatch slurm/train.sbatch <overrides>` by hand; once training runs, send the pre-timeout
    warning (USR1 to the batch shell); the job checkpoints, requeues itself and is released."""
    run_dir = tmp_path_factory.mktemp("slurm") / "preempt"
    overrides = [*TINY, f"train.max_steps={PREEMPT_STEPS}", "logger=wandb", f"output_dir={run_dir}"]
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={run_dir.parent}/preempt-%j.out",
            "slurm/train.sbatch",
            *overrides,
        ],
        cwd=REPO,
        env=slurm_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    log = run_dir.parent / f"preempt-{job}.out"

    # preflight.json is written once every rank has its stop handler: from then on the warning
    # stops the run after the next step, however fast the steps are.
    wait_until((run_dir / "preflight.json").is_file, JOB_TIMEOUT, "the ranks to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: job_field(job, "JobState") == "PENDING", 300, "the job to requeue itself")
    stopped_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    restarts = job_field(job, "Restarts")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    final = wait_until(
        lambda: (s := job_field(job, "JobState")) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
        JOB_TIMEOUT,
        "the requeued job to finish",
    )
    return run_dir, log, final, stopped_at, restarts


def test_preempted_job_checkpoints_requeues_and_resumes(preempted):
    run_dir, log, final, stopped_at, restarts = preempted
    text = log.read_text()
    assert final == "COMPLETED", text[-6000:]
    assert restarts == "1"
    assert "got USR1" in text and "requeueing job" in text
    step = int(stopped_at.removeprefix("step_"))
    assert 0 < step < PREEMPT_STEPS
    assert f"stopped on request at step {step}" in text
    assert f"resumed from {run_dir}/checkpoints/step_{step} at step {step}" in text
    assert "restart 1 on" in text  # SLURM_RESTART_COUNT in the requeued run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, PREEMPT_STEPS + 1))  # no step lost or repeated
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{PREEMPT_STEPS}"
    assert (run_dir / "export").is_dir()


def test_resumed_run_continues_the_same_wandb_run(preempted):
    run_dir = preempted[0]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one per SLURM start
    assert all(r.name.endswith(f"-{run_id}") for r in runs)


# ------------------------------------------------------------------ submitit sweep
@pytest.fixture(scope="module")
def submitit_sweep(slurm, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("slurm") / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.main",
            "-m",
            "hydra/launcher=submitit_slurm",
            "train.lr=1e-3,3e-3",
            *TINY,
            "train.max_steps=3",
            "logger=wandb",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        env=slurm_env(),
        capture_output=True,
        text=True,
        timeout=2 * JOB_TIMEOUT,
    )
    return sweep_dir, proc


def test_submitit_sweep_runs_each_trial_as_its_own_multi_rank_job(submitit_sweep):
    sweep_dir, proc = submitit_sweep
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1]
    assert all(r["status"] == "ok" and isinstance(r["eval_loss"], float) for r in rows), rows
    assert len({r["slurm_job_id"] for r in rows}) == 2  # one SLURM job per trial
    table = (sweep_dir / "summary.md").read_text()
    assert "| 0 | train.lr=0.001 |" in table and "| 1 | train.lr=0.003 |" in table  # named by swept key
    for r in rows:
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == sweep_dir
        assert json.loads((run_dir / "preflight.json").read_text())["world_size"] == 2
        assert sorted(train_losses(run_dir)) == [1, 2, 3]
        # One W&B run per trial: grouped by the sweep, named after its overrides, tagged.
        (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        data = wandb_file.read_bytes()
        assert b"sweep-" in data and f"train.lr={r['overrides'][0].split('=')[1]}".encode() in data
        assert b"strategy:ddp" in data and b"tuning:full" in data


# ------------------------------------------------------------------ srun straight into ranks
def test_srun_starts_ranks_straight_from_slurm_variables(slurm, tmp_path):
    """`srun python -m distft.train` with one task per rank, no torchrun: the ranks take rank,
    local size and the master address from SLURM's variables; hsdp shards over the node's 2 ranks."""
    run_dir = tmp_path / "srun"
    proc = subprocess.run(
        ["srun", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
         sys.executable, "-m", "distft.train", *TINY, "strategy=hsdp", "train.max_steps=2",
         "train.export=none", f"output_dir={run_dir}"],
        cwd=REPO, env=slurm_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["world_size"] == 2
    assert sorted((r["rank"], r["local_rank"]) for r in report["ranks"]) == [(0, 0), (1, 1)]
    assert sorted(train_losses(run_dir)) == [1, 2]
