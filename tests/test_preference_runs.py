"""Preference methods trained end to end: every DPO variant and KTO in one process, the reward model,
DPO and KTO on 2 real ranks (ZeRO-2/3, FSDP2; full, LoRA, QLoRA) with their learning thresholds,
resume equivalence, the reference paths, and the reward export scoring padded batches. The data,
loss-formula and reference units are in test_preference.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from distft.data.preference import default_pairs
from tests.util import FAST, metrics, train, train_losses


@pytest.mark.slow
def test_every_loss_type_trains_one_process(tmp_path):
    """Each DPO variant and KTO run end to end in this process (2 steps) and log their metrics."""
    from distft.train import main

    for name, overrides in {
        "simpo": ["method=dpo", "method.loss_type=simpo"],
        "orpo": ["method=dpo", "method.loss_type=orpo", "method.beta=0.2"],
        "hinge": ["method=dpo", "method.loss_type=hinge", "method.precompute_ref=true"],
        "kto": ["method=kto", "method.precompute_ref=true"],
    }.items():
        run = tmp_path / name
        args = [*FAST, f"output_dir={run}", *overrides, *SHORT, "train.max_steps=2", "train.export=none"]
        assert main(args) == 0, name
        first = _first(run)
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "loss"} <= set(first), name
        if name == "hinge":  # policy == (precomputed) reference before the first update
            assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(1.0)
        if name == "kto":
            assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- multi-rank training
SHORT = [
    "data.num_examples=200",
    "train.eval_generate=false",
    "train.micro_batch_size=8",
]


def _first(run: Path) -> dict:
    return next(r for r in metrics(run) if r.get("step") == 1 and "loss" in r)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def reward_zero2(tmp_path_factory):
    run = tmp_path_factory.mktemp("reward") / "zero2"
    train(
        run,
        "method=reward",
        "strategy=zero2",
        "data.num_examples=2000",
        "train.lr=1e-3",
        "train.max_steps=40",
    )
    return run


@pytest.mark.slow
def test_reward_model_learns_the_default_preferences(reward_zero2):
    s = _summary(reward_zero2)
    print(f"reward zero2: held-out accuracy {s['before']['accuracy']:.3f} -> {s['after']['accuracy']:.3f}")
    assert s["before"]["accuracy"] < 0.65
    assert s["after"]["accuracy"] >= 0.8
    assert s["after"]["margin"] > s["before"]["margin"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"} <= set(
        _first(reward_zero2)
    )
    final = [r for r in metrics(reward_zero2) if "eval/accuracy" in r][-1]
    assert {"eval/margin", "eval/rewards/accuracy", "eval/rewards/margins"} <= set(final)
    test = [r for r in metrics(reward_zero2) if "test/accuracy" in r][-1]
    assert test["test/accuracy"] == pytest.approx(test["test/rewards/accuracy"])  # the test split's own


@pytest.mark.slow
def test_reward_export_scores_a_padded_batch(reward_zero2):
    """The export loads with AutoModelForSequenceClassification, scores a right- or left-padded
    batch like each text alone, and ranks held-out chosen above rejected."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = reward_zero2 / "export"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    rows = default_pairs(60, seed=123)  # unseen pairs
    texts = [r["prompt"] + r[k] + tok.eos_token for r in rows for k in ("chosen", "rejected")]
    with torch.no_grad():
        alone = torch.tensor([float(model(**tok(t, return_tensors="pt")).logits) for t in texts[:8]])
        for side in ("right", "left"):
            tok.padding_side = side
            batch = tok(texts, return_tensors="pt", padding=True)
            scores = model(**batch).logits[:, 0]
            torch.testing.assert_close(scores[:8], alone, atol=1e-4, rtol=1e-4)
    chosen, rejected = scores[0::2], scores[1::2]
    assert float((chosen > rejected).float().mean()) >= 0.75


@pytest.mark.slow
def test_reward_lora_fsdp_exports_adapter_with_score_head(tmp_path):
    """LoRA reward model on FSDP2: the adapter export holds the trained score head (PEFT
    modules_to_save) and loads with AutoModelForSequenceClassification (one label)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "reward_lora"
    train(run, "method=reward", "strategy=fsdp", "tuning=lora", *SHORT, "train.max_steps=4")
    assert "rewards/accuracy" in _first(run)
    path = run / "export"
    meta = json.loads((path / "distft_export.json").read_text())
    assert meta["adapter"] and meta["probe_max_abs_diff"] < 1e-4
    assert "score" in json.loads((path / "adapter_config.json").read_text())["modules_to_save"]
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()  # the base copy says 1 label
    assert model.config.num_labels == 1
    ids = torch.tensor(meta["probe_input_ids"])
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits.flatten()
        torch.testing.assert_close(
            got, torch.tensor(meta["probe_logits"])[: got.numel()], atol=1e-4, rtol=1e-4
        )
        tok = AutoTokenizer.from_pretrained(path)
        texts = ["sort cba=abc" + tok.eos_token, "reverse abcd=dcba" + tok.eos_token]
        alone = [float(model(**tok(t, return_tensors="pt")).logits) for t in texts]
        padded = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
    torch.testing.assert_close(padded, torch.tensor(alone), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def dpo_zero2(tmp_path_factory):
    """DPO from the random-init tiny model (full tuning, frozen reference copy), checkpointed
    halfway; then resumed from that checkpoint in a copy of the run."""
    root = tmp_path_factory.mktemp("dpo")
    run = root / "zero2"
    args = [
        "method=dpo",
        "strategy=zero2",
        "data.num_examples=2000",
        "train.max_steps=30",
        "train.save_every=15",
    ]
    train(run, *args, "train.keep_last=3")
    resumed = root / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step_30", "export", "summary.json"))
    (resumed / "checkpoints" / "latest").write_text("step_15\n")
    proc = train(resumed, *args, "train.keep_last=3")
    return run, resumed, proc.stdout


@pytest.mark.slow
def test_dpo_learns_the_default_preferences(dpo_zero2):
    run, _, _ = dpo_zero2
    s = _summary(run)
    before, after = s["before"]["accuracy"], s["after"]["accuracy"]
    print(f"dpo zero2: held-out preference accuracy {before:.3f} -> {after:.3f}")
    assert s["before"]["accuracy"] == 0.0  # policy == reference: every margin is 0
    assert s["after"]["accuracy"] >= 0.75
    first = _first(run)
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_resume_continues_like_the_uninterrupted_run(dpo_zero2):
    """Resumed at step 15 (the frozen reference rebuilt from the base), steps 16-30 repeat the
    uninterrupted run's losses and reward metrics."""
    run, resumed, stdout = dpo_zero2
    assert "resumed from" in stdout and "step_15 at step 15" in stdout
    a = {r["step"]: r for r in metrics(run) if "loss" in r}
    b = {r["step"]: r for r in metrics(resumed) if "loss" in r}  # rows after step 15 were rewritten
    assert sorted(b) == list(range(1, 31))
    for step in range(16, 31):
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert _summary(resumed)["after"]["accuracy"] == pytest.approx(_summary(run)["after"]["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,overrides",
    [
        # frozen reference copy sharded with the policy's fully_shard plan
        ("fsdp_full_hinge", ["strategy=fsdp", "method.loss_type=hinge"]),
        # reference = adapters disabled on the sharded 4-bit policy
        ("fsdp_qlora", ["strategy=fsdp", "tuning=qlora"]),
        # reference log-probs precomputed once under ZeRO-3 partitioned LoRA
        (
            "zero3_lora_precompute_ipo",
            ["strategy=zero3", "tuning=lora", "method.precompute_ref=true", "method.loss_type=ipo"],
        ),
        # frozen reference partitioned by an optimizer-free ZeRO-3 engine
        ("zero3_full", ["strategy=zero3"]),
    ],
)
def test_dpo_reference_paths(tmp_path, name, overrides):
    """Each reference path equals the policy before the first update (margins exactly 0), and
    the run trains, evaluates and exports."""
    run = tmp_path / name
    train(run, "method=dpo", *SHORT, "train.max_steps=3", *overrides)
    first = _first(run)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5), first
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5), first
    s = _summary(run)
    assert s["before"]["accuracy"] == 0.0 and 0.0 <= s["after"]["accuracy"] <= 1.0
    assert (run / "export" / "distft_export.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,tuning", [("zero2", "full"), ("fsdp", "lora")])
def test_kto_trains(tmp_path, strategy, tuning):
    run = tmp_path / f"kto_{strategy}"
    train(run, "method=kto", f"strategy={strategy}", f"tuning={tuning}", *SHORT, "train.max_steps=6")
    first = _first(run)
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/accuracy"} <= set(first)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - σ(0)
    losses = train_losses(run)
    assert losses[6] < losses[1]
    s = _summary(run)
    assert "accuracy" in s["after"] and "margin" in s["after"]
