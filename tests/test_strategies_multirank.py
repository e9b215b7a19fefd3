"""Each strategy family (DDP, FSDP2, DeepSpeed ZeRO-2) in-process on 2 real gloo ranks: the
golden-loss check and the wrap / step / save / load round trip, in one pair of processes spawned
inside pytest (as torch's MultiProcessTestCase does), so the stack is imported once for all three.

Golden losses (tests/golden/losses.json): the first 20 losses of the default job shrunk as below,
per family, must stay within 1e-4 — a numerics change cannot slip in unnoticed. After a change
that is meant to move them, regenerate the file and say why in the commit:

    DISTFT_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_strategies_multirank.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.util import FAST, free_port

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
FAMILIES = ("ddp", "fsdp", "zero2")
STEPS = 20
TOL = 1e-4
JOB = [
    *FAST,
    f"train.max_steps={STEPS}",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "train.export=none",
    "eval.test=false",
    "cluster.preflight=false",
]


def _fingerprint(strategy) -> list[float]:
    """Sum and sum of squares of every full weight (a collective; rank 0 returns them)."""
    sd = strategy.full_state_dict()
    return [
        float(sum(v.double().sum() for v in sd.values())),
        float(sum((v.double() ** 2).sum() for v in sd.values())),
    ]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from distft.config.load import load_config
    from distft.engine import checkpoint
    from distft.engine.trainer import Trainer

    out = {}
    for family in FAMILIES:
        run_dir = Path(root) / family
        cache = f"data.cache_dir={root}/data_cache"  # prepared here: the import check covers preparation
        cfg, composed = load_config([*JOB, f"strategy={family}", f"output_dir={run_dir}", cache])
        trainer = Trainer.build(cfg, composed)  # wrap
        trainer.train()  # 20 steps; the last is saved as checkpoints/latest
        st = trainer.strategy
        saved = _fingerprint(st)
        ctx = trainer.ctx  # one more optimizer step (the schedule's lr has reached 0) moves them ...
        ctx.run_step(
            [trainer.method.collate(rows) for rows in ctx.rank_examples(0)], trainer.method.loss, 1e-3
        )
        moved = _fingerprint(st)
        checkpoint.load(st, checkpoint.latest(run_dir), trainer.info)  # ... and loading restores them
        restored = _fingerprint(st)
        out[family] = {"saved": saved, "moved": moved, "restored": restored}
        out[family]["inductor_imported"] = "torch._inductor.compile_fx" in sys.modules
        out[family]["pandas_imported"] = any(m in sys.modules for m in ("datasets", "pandas"))
    if rank == 0:
        (Path(root) / "checks.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("families")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_golden_losses_per_strategy_family(families):
    got = {f: _losses(families / f) for f in FAMILIES}
    assert all(len(v) == STEPS for v in got.values()), {f: len(v) for f, v in got.items()}
    if os.environ.get("DISTFT_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"steps": STEPS, "job": JOB, "losses": got}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["job"] == JOB, "the job changed: regenerate tests/golden/losses.json (see module doc)"
    for family in FAMILIES:
        want = golden["losses"][family]
        worst = max(abs(a - b) for a, b in zip(got[family], want))
        assert worst <= TOL, f"{family}: losses moved by up to {worst:.3g} from tests/golden/losses.json"


@pytest.mark.slow
def test_wrap_step_save_load_round_trip_per_family(families):
    checks = json.loads((families / "checks.json").read_text())
    for family in FAMILIES:
        c = checks[family]
        assert c["moved"] != c["saved"], f"{family}: a step did not change the weights"
        assert c["restored"] == c["saved"], f"{family}: loading the checkpoint did not restore the weights"
    # DeepSpeed imports its Muon modules, whose decorators ran torch.compile and so imported all of
    # inductor (seconds of the first step); distft.perf.warm.deepspeed_muon defers them to first use.
    assert not checks["zero2"]["inductor_imported"]
    # Prepared rows are read and written with pyarrow alone: `datasets` imports pandas (~0.4 s a rank)
    assert not any(checks[f]["pandas_imported"] for f in FAMILIES)
