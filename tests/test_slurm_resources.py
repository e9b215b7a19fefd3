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
