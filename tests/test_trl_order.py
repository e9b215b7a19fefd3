"""bench/trl_compare.py's same-order run: TRL reads distft's rows in distft's batch order (issue 18)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from distft.data.sampler import GlobalBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.quick
def test_order_file_is_distft_global_batches_in_sampler_order(tmp_path):
    from trl_compare import write_distft_order

    rows = [{"prompt": f"p{i}=", "completion": f"c{i}", "_source": f"x:{i}"} for i in range(37)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = Namespace(micro=4, accum=1, nproc=2, seed=5)
    write_distft_order(a, tmp_path, tmp_path / "order.jsonl")
    got = [json.loads(x) for x in (tmp_path / "order.jsonl").read_text().splitlines()]
    sampler = GlobalBatchSampler(37, 8, 5)
    want = [rows[i] for s in range(sampler.steps_per_epoch) for i in sampler.global_indices(s)]
    assert len(got) == 32  # 4 whole global batches; the incomplete last one is dropped, as distft does
    assert got == [{"prompt": r["prompt"], "completion": r["completion"]} for r in want]
    assert len({r["prompt"] for r in got}) == 32  # every row once
    assert [r["prompt"] for r in got] != [r["prompt"] for r in rows[:32]]  # sampler order
