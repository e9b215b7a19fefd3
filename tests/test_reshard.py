"""Resume on a different number of ranks: 2 ranks → 1 → 2 continues with the same losses as an
uninterrupted 2-rank run. FSDP2 reshards through DCP (and the last leg switches to DDP: the same
DCP format); ZeRO through DeepSpeed's universal checkpoint, converted automatically, changing
stage on the way (ZeRO-2 on 2 ranks → ZeRO-1 on 1 → ZeRO-2 on 2). A
checkpoint of the other format (DCP vs DeepSpeed, or ZeRO-1/2 vs ZeRO-3, which DeepSpeed cannot
load into each other) is refused with a message that says what to do."""

from __future__ import annotations

import pytest

from tests.util import train, train_losses

pytestmark = pytest.mark.slow

TOL = 1e-4
COMMON = [
    "train.lr_scheduler=constant",
    "train.lr=1e-3",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "train.keep_last=10",
    "eval.test=false",
    "train.export=none",
    "model.num_layers=2",
    "data.num_examples=200",
]
# The same global batch of 8 on 2 ranks (micro 4) and on 1 rank (micro 8).
TWO = ["train.micro_batch_size=4"]
ONE = ["train.micro_batch_size=8"]


@pytest.fixture(scope="module", params=["fsdp", "zero2"])
def chain(request, tmp_path_factory):
    strategy = request.param
    root = tmp_path_factory.mktemp(f"reshard_{strategy}")
    common = [f"strategy={strategy}", *COMMON]
    train(root / "two", *common, *TWO, "train.max_steps=6", "train.save_every=2")
    # ZeRO also changes stage on the way (2 → 1 → 2): DeepSpeed's universal checkpoint loads into
    # either of ZeRO-1/2 (not into ZeRO-3: refused below).
    middle = "strategy=zero1" if strategy == "zero2" else f"strategy={strategy}"
    one = train(
        root / "one",
        *common,
        middle,
        *ONE,
        "train.max_steps=4",
        f"resume={root / 'two/checkpoints/step_2'}",
        nproc=1,
    )
    last = "strategy=ddp" if strategy == "fsdp" else "strategy=zero2"  # DCP: DDP reads FSDP's
    back = train(
        root / "back", *common, last, *TWO, "train.max_steps=6", f"resume={root / 'one/checkpoints/step_4'}"
    )
    return strategy, root, one.stdout + one.stderr, back.stdout + back.stderr


def _rel(a: dict, b: dict, steps) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def test_two_to_one_to_two_ranks_same_losses(chain):
    strategy, root, one_log, back_log = chain
    ref = train_losses(root / "two")
    one, back = train_losses(root / "one"), train_losses(root / "back")
    assert sorted(one) == [3, 4] and sorted(back) == [5, 6]
    assert _rel(one, ref, (3, 4)) <= TOL, (one, ref)
    assert _rel(back, ref, (5, 6)) <= TOL, (back, ref)
    assert ref[6] < ref[1]
    if strategy.startswith("zero"):  # the conversion happened, automatically, both ways
        assert "(strategy=zero2); converting it to a DeepSpeed universal checkpoint for 1 ranks" in one_log
        assert "(strategy=zero1); converting it to a DeepSpeed universal checkpoint for 2 ranks" in back_log
        assert (root / "two/checkpoints/step_2/deepspeed_universal/zero").is_dir()


def test_other_format_is_refused_with_a_clear_message(chain, tmp_path):
    strategy, root, _, _ = chain
    other = "zero2" if strategy == "fsdp" else "zero3"
    proc = train(
        tmp_path / "cross",
        f"strategy={other}",
        *COMMON,
        *ONE,
        "train.max_steps=6",
        f"resume={root / 'two/checkpoints/step_2'}",
        plain=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    if strategy == "fsdp":
        assert "was written by strategy=fsdp (dcp format)" in proc.stderr
    else:
        assert "cannot load a ZeRO-1/2 checkpoint into strategy=zero3" in proc.stderr
        assert "Resume with zero1, zero2 (any number of ranks)" in proc.stderr
    assert "resume=never model.name_or_path=" in proc.stderr
