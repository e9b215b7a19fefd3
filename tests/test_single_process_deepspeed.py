"""`python -m distft.train strategy=zero2` as one plain process (no launcher, no MPI) trains."""

from __future__ import annotations

import pytest

from tests.util import train, train_losses


@pytest.mark.slow
def test_one_plain_process_runs_deepspeed_zero2_without_mpi(tmp_path):
    run_dir = tmp_path / "z2"
    proc = train(
        run_dir, "strategy=zero2", "train.max_steps=2", "data.num_examples=100", "train.eval_generate=false",
        "train.export=none", "eval.test=false", plain=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mpi4py" not in proc.stderr
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
