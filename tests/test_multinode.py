"""Two "nodes" on one machine: two `distft-launch` launchers (torchrun --nnodes=2, distinct node
ranks) meet at one c10d rendezvous endpoint and train as one job; DDP and HSDP (2-D mesh)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.util import FAST, REPO, env, free_port, metrics, train_losses

STEPS = 4
COMMON = [*FAST, "data.num_examples=200", "train.eval_generate=false", f"train.max_steps={STEPS}"]


def launch_two_nodes(run_dir, *overrides: str, nproc: int, timeout: int = 600, extra_env=None) -> list:
    """Start node 1 first (it must wait for the rendezvous), then node 0; wait for both."""
    port = free_port()
    procs = []
    for node in (1, 0):
        cmd = [
            sys.executable,
            "-m",
            "launch.main",
            *COMMON,
            f"output_dir={run_dir}",
            "cluster.nodes=2",
            f"cluster.node_rank={node}",
            f"cluster.nproc_per_node={nproc}",
            f"cluster.master_port={port}",
            "cluster.hang_dump_s=1",  # a step that takes longer (see ddp_two_nodes): every rank dumps
            *overrides,
        ]
        log = open(run_dir.parent / f"{run_dir.name}-node{node}.log", "w")
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=log, stderr=subprocess.STDOUT
        )
        procs.append((node, proc))
        time.sleep(1.0)
    deadline = time.monotonic() + timeout
    out = []
    for node, p in procs:
        rc = p.wait(timeout=max(1, deadline - time.monotonic()))
        text = (run_dir.parent / f"{run_dir.name}-node{node}.log").read_text()
        assert rc == 0, f"node {node} exited {rc}:\n{text[-6000:]}"
        out.append(text)
    return out


@pytest.fixture(scope="module")
def ddp_two_nodes(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mn") / "ddp"
    # Rank 1 stalls 3 s before step 3 (rank 0 waits for it in the step's collective): with
    # cluster.hang_dump_s=1 both ranks' watchdogs fire mid-training, whatever the machine's speed.
    stall = {"DISTFT_FAULT_SLEEP": "3:3@1"}
    logs = launch_two_nodes(run_dir, "strategy=ddp", "train.micro_batch_size=8", nproc=1, extra_env=stall)
    return run_dir, logs


@pytest.fixture(scope="module")
def hsdp_two_nodes(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mn") / "hsdp"
    logs = launch_two_nodes(run_dir, "strategy=hsdp", "train.micro_batch_size=4", nproc=2)
    return run_dir, logs


@pytest.mark.slow
def test_two_nodes_form_one_job_and_train(ddp_two_nodes):
    run_dir, logs = ddp_two_nodes
    assert any("node 0/2" in x for x in logs) and any("node 1/2" in x for x in logs)
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1]
    assert report["all_reduce_busbw_gbps"] > 0 and report["all_reduce_latency_us"] > 0
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "export").is_dir()
    assert any("eval/loss" in r for r in metrics(run_dir))


@pytest.mark.slow
def test_every_rank_dumps_stacks_when_no_step_finishes_in_time(ddp_two_nodes):
    run_dir, _ = ddp_two_nodes
    texts = [(run_dir / "stacks" / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    for text in texts:
        assert "Timeout" in text and "File " in text, text[:2000]
    assert "inject_sleep" in texts[1] and "train_step" in texts[0]  # the stalled rank, the waiting one


@pytest.mark.slow
def test_hsdp_on_two_nodes_matches_ddp(ddp_two_nodes, hsdp_two_nodes):
    """Same global batch (2 ranks × 8 vs 4 ranks × 4): HSDP over a (2 replicas × 2 shards) mesh
    gives DDP's losses."""
    hsdp_dir, _ = hsdp_two_nodes
    report = json.loads((hsdp_dir / "preflight.json").read_text())
    assert report["world_size"] == 4
    ddp, hsdp = train_losses(ddp_two_nodes[0]), train_losses(hsdp_dir)
    assert sorted(hsdp) == sorted(ddp)
    for step in ddp:
        assert hsdp[step] == pytest.approx(ddp[step], rel=1e-4), (step, ddp, hsdp)
    assert (hsdp_dir / "export").is_dir()


@pytest.mark.slow
def test_unreachable_rendezvous_fails_naming_host_and_port(tmp_path):
    port = free_port()
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.main",
            *COMMON,
            f"output_dir={tmp_path / 'run'}",
            "cluster.nodes=2",
            "cluster.node_rank=1",
            f"cluster.master_port={port}",
            "cluster.rdzv_timeout_s=2",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "within 2 s" in proc.stderr
    assert time.monotonic() - start < 240  # bounded by the timeout, not a hang
