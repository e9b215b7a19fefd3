"""Stop signals with real processes: SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 to distft-launch,
and SIGUSR1 to its torchrun, reach the ranks, which agree, checkpoint and exit 75; the launcher
exits 75 after them and no process outlives it. A stopped (SIGSTOP) rank is named by its peers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.util import FAST, REPO, env, free_port

LONG = [*FAST, "data.num_examples=200", "train.eval_generate=false", "train.max_steps=100000"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """distft-launch in its own process group, as a shell starts a foreground job."""
    cmd = [sys.executable, "-m", "launch.main", *LONG, f"output_dir={run_dir}"]
    cmd += [f"cluster.master_port={free_port()}", "train.save_every=0", *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> dict[int, int]:
    """Rank pids once every rank has its stop handler (preflight.json) and a step has run."""
    deadline = time.monotonic() + timeout
    report = run_dir / "preflight.json"
    while proc.poll() is None and time.monotonic() < deadline:
        log = run_dir / "metrics.jsonl"
        if report.is_file() and log.is_file() and '"loss"' in log.read_text():
            return {r["rank"]: r["pid"] for r in json.loads(report.read_text())["ranks"]}
        time.sleep(0.2)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    raise AssertionError(f"the ranks did not start training (rc {proc.poll()}):\n{out[-4000:]}")


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def finish(proc: subprocess.Popen, pids: list[int], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        for pid in pids:  # never leave a training rank behind, whatever the outcome
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    return out


def assert_stopped_cleanly(proc, run_dir: Path, out: str, pids: list[int], name: str) -> None:
    assert proc.returncode == 75, f"{name}: launcher exited {proc.returncode}\n{out[-5000:]}"
    time.sleep(0.5)
    assert not [p for p in pids if alive(p)], f"{name}: processes outlived the launcher\n{out[-3000:]}"
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"stopped on request at {step.replace('_', ' ')} after writing its checkpoint" in out, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "SignalException" not in out, out


@pytest.mark.slow
def test_every_stop_signal_reaches_the_ranks_and_nothing_outlives_the_launcher(tmp_path):
    """One 1-rank job per signal, run side by side: SIGTERM, SIGHUP, SIGUSR1 to the launcher and
    SIGUSR1 to its torchrun (the SLURM node launcher's path: srun forwards USR1 to it)."""
    cases = [("SIGTERM", "launcher"), ("SIGHUP", "launcher"), ("SIGUSR1", "launcher")]
    cases.append(("SIGUSR1", "torchrun"))
    jobs = []
    for name, target in cases:
        run_dir = tmp_path / f"{name}-{target}"
        jobs.append((name, target, run_dir, start(run_dir, "cluster.nproc_per_node=1")))
    sent = []
    try:
        for name, target, run_dir, proc in jobs:
            ranks = list(wait_training(proc, run_dir).values())
            torchrun = children(proc.pid)
            assert len(torchrun) == 1, torchrun
            os.kill(proc.pid if target == "launcher" else torchrun[0], getattr(signal, name))
            sent.append((name, target, run_dir, proc, [*ranks, *torchrun]))
    finally:
        for *_, proc in jobs:
            if proc.poll() is None and not any(s[3] is proc for s in sent):
                proc.kill()
    for name, target, run_dir, proc, pids in sent:
        out = finish(proc, pids)
        assert_stopped_cleanly(proc, run_dir, out, pids, f"{name} to {target}")
        assert f"got {name}" in out


@pytest.mark.slow
def test_ctrl_c_checkpoints_in_one_line_and_a_stopped_rank_is_named(tmp_path):
    """Two ranks. Rank 1 is frozen with SIGSTOP: rank 0's watchdog names it (pid, host) within
    hang_dump_s, well inside the collective timeout. Then SIGCONT and Ctrl-C (SIGINT to the whole
    foreground process group, as a terminal sends it): both ranks agree, checkpoint, exit 75."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "cluster.hang_dump_s=2", "cluster.timeout_s=120")
    pids = wait_training(proc, run_dir)
    torchrun = children(proc.pid)
    everyone = [*pids.values(), *torchrun]
    try:
        os.kill(pids[1], signal.SIGSTOP)
        stacks = run_dir / "stacks" / "rank0.txt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "is stopped" not in _text(stacks):
            time.sleep(0.2)
        text = stacks.read_text()
        assert f"rank 1 (pid {pids[1]} on " in text and f"kill -CONT {pids[1]}" in text, text[-3000:]
        os.kill(pids[1], signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the launcher's process group
    except BaseException:
        for pid in everyone:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise
    out = finish(proc, everyone)
    assert_stopped_cleanly(proc, run_dir, out, everyone, "Ctrl-C")
    assert out.count("got SIGINT") == 1 and f"distft: rank 1 (pid {pids[1]}" in out


@pytest.mark.quick
def test_preflight_bandwidth_all_reduce_is_large_enough_on_gpu():
    """4 MiB over NVLink/InfiniBand takes tens of microseconds: latency, not bandwidth."""
    import torch

    from distft.runtime.preflight import bandwidth_mib

    assert bandwidth_mib(torch.device("cuda", 3)) == 256
    assert bandwidth_mib(torch.device("cpu")) == 4  # gloo on CPU: a sanity check, kept quick
