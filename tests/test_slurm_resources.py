"""SLURM without a cluster: the local cluster's CPU count, GPU job resources in the rendered batch
script, and ranks placed from SLURM's variables (`srun python -m distft.train` straight into ranks)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.util import REPO


@pytest.mark.quick
def test_local_cluster_counts_the_machines_cpus_whatever_omp_num_threads_says():
    line = next(
        x for x in (REPO / "slurm" / "local_cluster.sh").read_text().splitlines() if x.startswith("CPUS=")
    )
    env = {k: v for k, v in os.environ.items() if k != "DISTFT_SLURM_CPUS"}
    out = subprocess.run(
        ["bash", "-c", f'{line}\necho "$CPUS"'],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert (
        int(out.stdout.strip())
        == os.cpu_count()
        == int(re.sub(r"\D", "", subprocess.getoutput("nproc --all")))
    )


# ------------------------------------------------------------------ srun straight into ranks
SLURM_TWO_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


@pytest.mark.quick
def test_placement_comes_from_slurm_variables_without_a_launcher():
    from distft.runtime.dist import placement

    env = {**SLURM_TWO_NODES, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    p = placement(env, hostnames=lambda nodelist: ["gpu07", "gpu08"])
    # Local size 2 (not the whole world: hsdp would become fsdp); the first node hosts the store.
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size) == (3, 4, 1, 2)
    assert (p.master_addr, p.master_port) == ("gpu07", 29500 + 4242)
    # A launcher's variables win (torchrun under srun: one task per node).
    p = placement({**env, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (p.rank, p.world_size, p.local_world_size) == (5, 8, 4)


@pytest.mark.quick
def test_nodelist_tasks_per_node_and_device_parsers():
    from distft.runtime.dist import device_for, expand_nodelist, slurm_tasks_per_node

    assert expand_nodelist("gpu[07-09,12],login1,a-b[1-2]") == [
        "gpu07", "gpu08", "gpu09", "gpu12", "login1", "a-b1", "a-b2",
    ]  # fmt: skip
    assert expand_nodelist("n1") == ["n1"]
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert str(device_for(3, 8)) == "cuda:3"  # all the node's GPUs visible
    assert str(device_for(3, 1)) == "cuda:0"  # srun --gpus-per-task=1: the task's only GPU
    assert str(device_for(1, 0)) == "cpu"


PLAIN_RANK = """
import json, sys
import torch, torch.distributed as tdist
from distft.config.load import load_config
from distft.runtime import dist
from distft.strategies import hsdp
from torch.distributed.device_mesh import init_device_mesh

info = dist.init(60)
cfg, _ = load_config(["strategy=hsdp"])
shape = hsdp.mesh_shape(cfg, info)
mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
t = torch.tensor([float(info.rank + 1)])
tdist.all_reduce(t)
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_world_size,
                  "mesh": list(shape), "shard_group": mesh["shard"].size(), "sum": t.item(),
                  "master": __import__("os").environ["MASTER_ADDR"]}))
dist.shutdown()
"""


@pytest.mark.slow
def test_plain_processes_with_only_slurm_variables_form_the_group_and_hsdp_mesh(tmp_path):
    """Two processes as `srun --ntasks=2 --ntasks-per-node=1` would start them on two nodes (here
    both on this host): no torchrun, no RANK/MASTER_ADDR. HSDP's shard group is one node's ranks (1),
    not the world (2)."""
    import json
    import socket
    import sys

    from tests.util import env, free_port

    port = next(p for p in iter(free_port, None) if 29500 <= p < 39500)
    host = socket.gethostname()
    base = {
        k: v
        for k, v in env().items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
    }
    base.update(
        SLURM_JOB_ID=str(port - 29500), SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)",
        SLURM_JOB_NODELIST=f"{host},{host}",
    )  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PLAIN_RANK],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r)},
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r, row in enumerate(rows):
        assert row == {
            "rank": r, "world": 2, "local": 1, "mesh": [2, 1], "shard_group": 1, "sum": 3.0, "master": host,
        }  # fmt: skip


# ------------------------------------------------------------------ GPU job resources (dry run)
def _dry_run(capsys, tmp_path, *overrides: str) -> str:
    from launch.main import main as launch_main

    assert launch_main(["launch.dry_run=true", f"output_dir={tmp_path / 'run'}", *overrides]) == 0
    return capsys.readouterr().out


@pytest.mark.quick
def test_gpu_recipe_renders_gpu_node_resources(tmp_path, capsys):
    """The 70B LoRA 2x8-GPU recipe: whole-node memory and CPUs per GPU, not the CPU defaults."""
    out = _dry_run(capsys, tmp_path, "experiment=llama31_70b_lora_fsdp_2x8", "cluster.partition=gpu")
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --mem=0",
        "# distft: 2 node(s) x 8 rank(s) per node; per node 8 GPU(s), 64 CPUs, memory the whole node",
    ]:
        assert line in out, line
    assert "--mem=8G" not in out and "--cpus-per-task=2\n" not in out
    # srun repeats the CPUs (Slurm 22.05-23.02 do not pass them on to the step).
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in out


@pytest.mark.quick
def test_gpus_per_node_alone_sets_ranks_per_node(tmp_path, capsys):
    out = _dry_run(capsys, tmp_path, "cluster.gpus_per_node=8")
    assert "--nproc-per-node=8" in out  # not min(2, 8)
    out = _dry_run(capsys, tmp_path, "cluster=slurm", "cluster.gpus_per_node=4", "cluster.cpus_per_gpu=12")
    assert "4 rank(s) per node; per node 4 GPU(s), 48 CPUs, memory the whole node" in out
    # Given values win; CPU nodes keep the small defaults.
    out = _dry_run(capsys, tmp_path, "cluster=slurm", "cluster.gpus_per_node=4", "cluster.nproc_per_node=2",
                   "cluster.cpus_per_task=16", "cluster.mem=100G")  # fmt: skip
    assert "#SBATCH --cpus-per-task=16" in out and "#SBATCH --mem=100G" in out and "x 2 rank(s)" in out
    out = _dry_run(capsys, tmp_path, "cluster=slurm")
    assert "#SBATCH --cpus-per-task=2" in out and "#SBATCH --mem=8G" in out and "x 2 rank(s)" in out


@pytest.mark.quick
def test_network_interface_is_exported_for_nccl_and_gloo(tmp_path, capsys):
    out = _dry_run(capsys, tmp_path, "cluster=slurm", "cluster.network_interface=ib0")
    setup = out.split("# distft:setup-begin", 1)[1].split("# distft:setup-end", 1)[0]
    assert "export NCCL_SOCKET_IFNAME=ib0" in setup and "export GLOO_SOCKET_IFNAME=ib0" in setup
    from distft.config.load import load_config
    from launch.local import environment

    cfg, _ = load_config(["cluster.network_interface=eth1"])
    e = environment(cfg.cluster, None)
    assert e["NCCL_SOCKET_IFNAME"] == e["GLOO_SOCKET_IFNAME"] == "eth1"


@pytest.mark.quick
def test_requeue_without_scontrol_explains_instead_of_failing(tmp_path):
    """A job whose environment lacks scontrol (container image): one line saying how to go on."""
    script = (REPO / "slurm" / "train.sbatch").read_text()
    start = script.index("requeue_job() {")
    func = script[start : script.index("\n}\n", start) + 3]
    body = f'OVERRIDES=(train.max_steps=9)\n{func}\nPATH=/nonexistent; requeue_job; echo "rc=$?"'
    out = subprocess.run(
        ["bash", "-c", body],
        env={"SLURM_JOB_ID": "77"}, capture_output=True, text=True,
    )  # fmt: skip
    assert "cannot requeue job 77: scontrol is not installed here" in out.stdout, out
    assert "train.max_steps=9" in out.stdout and "rc=1" in out.stdout
