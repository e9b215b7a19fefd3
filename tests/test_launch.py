"""distft-launch on this machine: dry runs (torchrun command, rendered SLURM script), elastic
restarts, local sweeps (basic and Optuna) with W&B per trial, the deepspeed launcher, and data
preparation that never races a collective timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from distft.config.load import load_config
from launch import local as local_launch
from launch import slurm as slurm_launch
from launch.main import main as launch_main
from tests.util import FAST, REPO, env, free_port, metrics, train_losses

TINY = [*FAST, "data.num_examples=200", "train.eval_generate=false"]


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.main", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------ torchrun forked from the launcher
FORK_PROBE = """
import os, sys, torch
from launch import supervise
cmd = [sys.executable, "-m", "launch.torchrun", *sys.argv[1:]]
proc = supervise._start(cmd, dict(os.environ, PROBE="1"))
print(type(proc).__name__, proc.wait())
"""


@pytest.mark.quick
def test_torchrun_is_forked_from_a_launcher_that_imported_torch(tmp_path):
    """The launcher validates the config with torch imported, so torchrun's agent is a fork of it
    (no second interpreter importing torch): it runs launch.torchrun and its exit code comes back."""
    script = "import os, sys; sys.exit(0 if os.environ.get('PROBE') == '1' else 5)"
    (tmp_path / "probe.py").write_text(script)
    ok = subprocess.run(
        [sys.executable, "-c", FORK_PROBE, "--nproc-per-node=1", "--standalone", str(tmp_path / "probe.py")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.stdout.split()[:2] == ["_Forked", "0"], ok.stdout + ok.stderr  # the env reached the rank
    bad = subprocess.run(
        [sys.executable, "-c", FORK_PROBE, "--no-such-flag"], cwd=REPO, env=env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert bad.stdout.split()[:2] == ["_Forked", "2"], bad.stdout + bad.stderr  # argparse's exit code
    bare_exit = "import sys; from launch import torchrun; torchrun.main = lambda argv: sys.exit()\n"
    done = subprocess.run(
        [sys.executable, "-c", bare_exit + FORK_PROBE], cwd=REPO, env=env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.split()[:2] == ["_Forked", "0"], done.stdout + done.stderr  # sys.exit() is 0


@pytest.mark.quick
def test_validating_a_config_does_not_import_checkpointing():
    """distft-launch validates the config (importing the strategies) and forks torchrun from
    itself: neither needs torch.distributed.checkpoint (DTensor, sympy: 0.4 s of its start)."""
    probe = (
        "import sys; from distft.config.load import load_config; load_config(['strategy=fsdp']); "
        "print('torch' in sys.modules, 'torch.distributed.checkpoint' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


# ------------------------------------------------------------------ dry runs (no process starts)
@pytest.mark.quick
def test_local_dry_run_prints_the_torchrun_command_and_starts_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = launch_main(
        ["launch.dry_run=true", "cluster.nproc_per_node=3", "cluster.max_restarts=2", f"output_dir={run_dir}"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "-m launch.torchrun" in out and "--nproc-per-node=3" in out and "--max-restarts=2" in out
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in out
    assert "--rdzv-backend=c10d" in out and "-m distft.train" in out
    # The ranks get plain overrides: no launcher-only keys, the resolved run dir.
    assert f"output_dir={run_dir}" in out and "launch.dry_run" not in out.split("distft.train", 1)[1]
    assert not run_dir.exists()


@pytest.mark.quick
def test_config_errors_stop_the_launcher_before_anything_starts(capsys):
    assert launch_main(["cluster=slurm", "cluster.partitoin=gpu", "launch.dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert "cluster.partitoin" in err and "partition" in err


def _rendered(tmp_path, *overrides: str) -> str:
    cfg, _ = load_config(["cluster=slurm", f"output_dir={tmp_path}", *overrides])
    return slurm_launch.render(
        cfg, ["train.max_steps=7", "model.name_or_path='a b'", f"output_dir={tmp_path}"]
    )


@pytest.mark.quick
def test_slurm_script_renders_every_resource_key(tmp_path):
    script = _rendered(
        tmp_path,
        "cluster.nodes=2",
        "cluster.gpus_per_node=4",
        "cluster.nproc_per_node=0",
        "cluster.partition=gpu",
        "cluster.account=proj",
        "cluster.qos=high",
        "cluster.time=02:30:00",
        "cluster.constraint=h100",
        "cluster.cpus_per_task=32",
        "cluster.mem=200G",
        "cluster.signal_before_s=300",
        "cluster.sbatch_extra=[--exclusive,'mail-type=END']",
        "cluster.setup=['module load cuda/12.4','source /opt/venv/bin/activate']",
        "cluster.container_image='nvcr.io/nvidia/pytorch:25.01-py3'",
        "cluster.container_mounts=['/data:/data']",
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --time=02:30:00",
        "#SBATCH --constraint=h100",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --mem=200G",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
        "module load cuda/12.4",
        "source /opt/venv/bin/activate",
        "--container-image=nvcr.io/nvidia/pytorch:25.01-py3",
        "--container-mounts=/data:/data",
    ]:
        assert line in script, line
    assert "OVERRIDES=(train.max_steps=7 'model.name_or_path='\"'\"'a b'\"'\"'' " in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.quick
def test_slurm_script_apptainer_and_no_requeue(tmp_path):
    script = _rendered(
        tmp_path,
        "cluster.container_image=/img/t.sif",
        "cluster.container_runtime=apptainer",
        "cluster.requeue=false",
    )
    assert "LAUNCH=(apptainer exec /img/t.sif python -m launch.local)" in script
    assert "REQUEUE=0" in script and "#SBATCH --requeue" not in script


@pytest.mark.quick
def test_slurm_dry_run_prints_script_and_sbatch_command(tmp_path, capsys):
    assert launch_main(["cluster=slurm", "launch.dry_run=true", f"output_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and f"sbatch --parsable {tmp_path / 'r'}/train.sbatch" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.quick
def test_shipped_template_is_valid_bash_with_requeue_and_warning_signal():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")]).returncode == 0


@pytest.mark.quick
def test_slurm_node_placement_comes_from_slurm_variables():
    cfg, _ = load_config(["cluster=slurm"])
    c = local_launch.slurm_node(
        cfg.cluster,
        {"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n1"},
        hostnames=lambda nodelist: ["n1", "n2"],
    )
    assert (c.nodes, c.node_rank, c.master_addr) == (2, 1, "n1")
    assert c.master_port == local_launch.slurm_port(cfg.cluster.master_port, 1234)


# ------------------------------------------------------------------ elastic restarts
@pytest.mark.slow
def test_elastic_launch_restarts_the_group_after_a_rank_dies_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    steps = 100  # long enough that the kill after the first checkpoint lands mid-run
    cmd = [
        sys.executable, "-m", "launch.main", *TINY, f"output_dir={run_dir}", f"train.max_steps={steps}",
        "train.save_every=5", "cluster.max_restarts=1", f"cluster.master_port={free_port()}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 600
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.is_file(), "no checkpoint before the run ended"
        pids = {r["rank"]: r["pid"] for r in json.loads((run_dir / "preflight.json").read_text())["ranks"]}
        os.kill(pids[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-6000:]
    assert "resumed from" in out
    assert (run_dir / "config.yaml").is_file()  # written by the launcher before any rank
    assert max(train_losses(run_dir)) == steps
    assert "all-reduce  : 4 MiB" in out and "bus bandwidth" in out  # the preflight report


# ------------------------------------------------------------------ sweeps
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "basic"
    proc = launch(
        "-m", "tuning=lora", "tuning.r=4", "train.precision=fp32,fp99", *TINY, "train.max_steps=3",
        "logger=wandb", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    return sweep_dir, proc


@pytest.mark.slow
def test_local_sweep_runs_trials_as_whole_jobs_and_a_failed_trial_does_not_stop_it(local_sweep):
    sweep_dir, proc = local_sweep
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1]
    ok, bad = rows
    assert ok["status"] == "ok" and isinstance(ok["eval_loss"], float)
    assert bad["status"].startswith("config error") and "fp99" in bad["status"]
    run_dir = Path(ok["run_dir"])
    assert run_dir.parent == sweep_dir and run_dir.name == "0"
    assert json.loads((run_dir / "preflight.json").read_text())["world_size"] == 2  # a whole 2-rank job
    assert json.loads((run_dir / "summary.json").read_text())["eval/loss"] == ok["eval_loss"]
    table = (sweep_dir / "summary.md").read_text()
    assert "| trial | overrides | final eval loss | status |" in table
    assert f"| 0 | train.precision=fp32 | {ok['eval_loss']:.4f} | ok |" in table  # the swept key
    assert "| 1 | train.precision=fp99 | - | config error" in table
    assert "distft sweep summary" in proc.stdout


@pytest.mark.slow
def test_sweep_trial_has_its_own_wandb_run_grouped_named_and_tagged(local_sweep):
    sweep_dir, _ = local_sweep
    run_dir = sweep_dir / "0"
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    group = "sweep-" + "_".join(sweep_dir.parts[-2:])
    assert group.encode() in data
    assert b"train.precision=fp32" in data  # named after its swept overrides
    for tag in (b"model:tiny", b"tuning:lora", b"method:sft", b"strategy:ddp"):
        assert tag in data


@pytest.mark.slow
def test_optuna_sweep_minimizes_the_final_eval_loss(tmp_path):
    sweep_dir = tmp_path / "optuna"
    proc = launch(
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=1", "train.lr=interval(1e-3,1e-2)", *TINY, "train.max_steps=3",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert rows[0]["overrides"] != rows[1]["overrides"]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["eval_loss"] for r in rows))


# ------------------------------------------------------------------ other launchers
@pytest.mark.slow
def test_deepspeed_launcher_runs_distft_train(tmp_path):
    run_dir = tmp_path / "ds"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run(
        [
            str(deepspeed),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "distft.train",
            *TINY,
            "strategy=zero1",
            "train.max_steps=3",
            f"output_dir={run_dir}",
        ],  # fmt: skip
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert json.loads((run_dir / "preflight.json").read_text())["world_size"] == 2
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert any("eval/loss" in r for r in metrics(run_dir))


# ------------------------------------------------------------------ data prep vs collective timeout
RACE_SCRIPT = textwrap.dedent(
    """
    import datetime, os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from distft.config.load import load_config
    from distft.data.pipeline import prepare_cached
    from distft.methods import METHODS
    from distft.models.tiny import build_tokenizer

    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    rank = dist.get_rank()
    cfg, _ = load_config(["data.num_examples=200", f"output_dir={out}", f"data.cache_dir={out}/cache"])
    tok = build_tokenizer()
    Method = METHODS[cfg.method.name]

    class SlowToTokenize(Method):  # a data set that takes longer to encode than the timeout
        @staticmethod
        def encode(rows, tokenizer, cfg, train):
            time.sleep(3)
            return Method.encode(rows, tokenizer, cfg, train)

    if mode == "file":  # the pipeline: rank 0 prepares, the others wait on the cache file
        data = prepare_cached(cfg, SlowToTokenize(cfg, tok), tok, out, rank == 0)
    else:  # control: the others wait in a collective instead
        if rank == 0:
            for _ in range(3):
                SlowToTokenize.encode([], tok, cfg, True)
        dist.barrier()
        data = None
    t = torch.tensor([float(len(data.train)) if data else 0.0])
    dist.all_reduce(t)
    print(f"rank {rank} ok train={int(t.item())}", flush=True)
    dist.destroy_process_group()
    os._exit(0)  # as distft.train exits: a teardown abort after this line once failed the suite
    """
)


@pytest.mark.slow
def test_data_preparation_longer_than_the_collective_timeout_does_not_fail(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node=2",
                f"--master-port={free_port()}",
                str(script),
                mode,
                str(tmp_path / mode),
            ],  # fmt: skip
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok = run("file")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-4000:]
    assert "rank 0 ok" in ok.stdout and "rank 1 ok" in ok.stdout
    # Rank 0 prepared once (three splits × 3 s ≥ 9 s, three times the timeout); rank 1 read the cache.
    assert len(list((tmp_path / "file" / "data_cache").glob("*.ready"))) == 1
    # The control shows the timeout is real: waiting in a collective instead fails.
    control = run("barrier")
    assert control.returncode != 0 and "rank 1 ok" not in control.stdout
