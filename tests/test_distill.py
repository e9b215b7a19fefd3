"""On-policy distillation (method=distill): the generalized JSD equals TRL's GKD loss on fixed
tensors; CI runs the path for 2 steps on 2 ranks; the extended tier checks that a smaller tiny
student learns from a trained tiny teacher (held-out reward and exact match rise)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError
from distft.methods.distill import generalized_jsd
from tests.util import metrics, train


@pytest.mark.quick
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_generalized_jsd_matches_trl(beta):
    from trl.experimental.gkd import GKDTrainer

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, :2] = -100
    labels[2, 4] = -100
    for temperature in (1.0, 0.7):
        want = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature, reduction="sum")
        mine = (generalized_jsd(student, teacher, beta, temperature).double() * (labels != -100)).sum()
        assert abs(float(mine) - float(want)) < 1e-6, (beta, temperature, float(mine), float(want))
    if beta in (0.0, 1.0):  # the ends are the forward and reverse KL
        s, t = student.log_softmax(-1), teacher.log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1) if beta == 0 else (s.exp() * (s - t)).sum(-1)
        torch.testing.assert_close(generalized_jsd(student, teacher, beta).double(), kl, atol=1e-6, rtol=1e-6)


@pytest.mark.quick
def test_distill_config():
    cfg, _ = load_config(["method=distill", "method.teacher=/some/dir", "method.lmbda=0.25"])
    assert cfg.method.lmbda == 0.25 and cfg.method.beta == 0.5
    with pytest.raises(ConfigError, match="method=distill needs method.teacher"):
        load_config(["method=distill"])


# The student: a narrower, shallower tiny than the teacher (the tiny model after SFT on the default task).
STUDENT = [
    "model.hidden_size=96",
    "model.intermediate_size=192",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=4",
]


@pytest.mark.slow
def test_distill_runs_on_two_ranks(tmp_path, tiny_model_dir):
    """2 steps of a smaller student against the tiny model as teacher on 2 real ranks: on- and
    off-policy rows both occur (lmbda=0.5, seeded), the loss is the GJSD, the student exports."""
    run = tmp_path / "student"
    train(run, "method=distill", f"method.teacher={tiny_model_dir}", *STUDENT, "train.max_steps=2",
          "train.micro_batch_size=8", "method.max_new_tokens=4", "data.max_eval_generations=8")  # fmt: skip
    rows = [r for r in metrics(run) if "on_policy" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in rows)
    assert 0 < sum(r["on_policy"] for r in rows) / 2 < 1
    evals = [r for r in metrics(run) if "eval/reward_greedy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 2 and "eval/exact_match" in evals[-1]
    assert (run / "export" / "model.safetensors").is_file()


# Extended: a teacher as good as the default job (held-out exact match 0.61 measured: 400 steps of
# 32 on the default 6000 examples), and enough student steps. With a 150-step teacher and 60 student
# steps the exact match stayed 0.00 (reward 0.00 -> 0.26); with this teacher, exact match after 60 /
# 200 / 300 student steps: 0.00 / 0.03 / 0.14 (greedy reward 0.24 / 0.54 / 0.66); lr_scale=3 was
# worse (0.00 at 300 steps).
TEACHER = ["method=sft", "train.max_steps=400", "train.micro_batch_size=32", "train.eval_every=0",
           "data.num_examples=6000", "data.max_eval_generations=64"]  # fmt: skip
DISTILL_STEPS = 300


@pytest.mark.slow
@pytest.mark.extended
def test_student_learns_from_teacher(tmp_path):
    """The student's held-out exact match and greedy char-match reward before → after distillation.
    Thresholds: exact match +0.08 (measured 0.00 -> 0.14), greedy reward +0.4 (0.00 -> 0.66)."""
    train(tmp_path / "teacher", *TEACHER, plain=True)
    teacher = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    train(
        tmp_path / "student",
        "method=distill",
        f"method.teacher={tmp_path / 'teacher' / 'export'}",
        *STUDENT,
        f"train.max_steps={DISTILL_STEPS}",
        "train.micro_batch_size=32",
        "method.max_new_tokens=6",
        "data.max_eval_generations=64",
        "train.lr_scheduler=constant",
        "train.warmup_steps=0",
        plain=True,
    )
    evals = [r for r in metrics(tmp_path / "student") if "eval/reward_greedy" in r]
    before, after = evals[0], evals[-1]
    print(
        f"distill: teacher exact match {teacher['after']['exact_match']:.3f}; student held-out greedy "
        f"reward {before['eval/reward_greedy']:.3f} -> {after['eval/reward_greedy']:.3f}, exact match "
        f"{before['eval/exact_match']:.3f} -> {after['eval/exact_match']:.3f}"
    )
    assert teacher["after"]["exact_match"] >= 0.4  # a teacher worth learning from
    assert before["step"] == 0 and after["step"] == DISTILL_STEPS
    assert after["eval/exact_match"] >= before["eval/exact_match"] + 0.08
    assert after["eval/reward_greedy"] >= before["eval/reward_greedy"] + 0.4
    rows = [r for r in metrics(tmp_path / "student") if "on_policy" in r]
    assert len(rows) == DISTILL_STEPS and 0.3 < sum(r["on_policy"] for r in rows) / len(rows) < 0.7
    assert rows[-1]["loss"] < rows[0]["loss"]  # the GJSD to the teacher falls
