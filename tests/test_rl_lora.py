"""PPO and GRPO with adapters out of the box (issue 17, point 7): the SFT warm-up trains the LoRA
adapter, the reference is the warm-started policy (the warm-up adapter swapped into the live
adapter for the reference forward: no second copy of the weights, no full-weight warm-up export),
and PPO's critic gets its own adapter and value head.

CI: the KL to the reference is 0 at the first RL step (policy == reference) for PPO (one process)
and for GRPO on 2 FSDP2 ranks (sharded adapter), where a resume keeps the reference. Extended:
GRPO + LoRA with beta=0.01 learns (last tenth's mean reward >= 1.2 × the first's; with the bare
base as reference it fell, 0.689 -> 0.538)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.rl_util import rewards, rows_with, tenths
from tests.util import train

pytestmark = pytest.mark.slow

COMMON = [
    "train.progress=false",
    "train.lr_scheduler=constant",
    "train.warmup_steps=0",
    "method.max_new_tokens=6",
    "train.micro_batch_size=8",
    "strategy=ddp",
    "tuning=lora",
    "model=tiny_pretrained",  # the shipped base pre-trained on other string tasks: adapters learn on it
]


def test_ppo_lora_reference_is_the_warm_start_and_critic_has_its_own_adapter(tmp_path):
    from transformers import AutoModelForTokenClassification

    run = tmp_path / "ppo"
    train(
        run,
        *COMMON,
        "method=ppo",
        "method.num_prompts=200",
        "method.sft_warmup_steps=2",
        "method.sft_warmup_lr=0.01",  # a warm-up that moves the adapter well away from the base
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "method.mini_batches=2",
        "data.max_eval_generations=4",
        "eval.test=false",
        plain=True,
    )
    rows = [r for r in rows_with(run, "value_loss")]
    assert len(rows) == 2 and all(math.isfinite(r["value_loss"]) for r in rows)
    # The reference is the warm start, so π = π_ref at first (the bare base gave a KL > 0 here).
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert not (run / "sft_warmup").exists()
    critic = AutoModelForTokenClassification.from_pretrained(run / "export" / "critic")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert float(critic(input_ids=ids).logits.abs().sum()) > 0  # the trained (zero-init) head
    assert (run / "export" / "adapter_config.json").is_file()


def test_grpo_lora_fsdp_reference_is_the_warm_start_and_survives_resume(tmp_path):
    common = [
        *COMMON,
        "strategy=fsdp",
        "method=grpo",
        "method.num_prompts=200",
        "method.num_generations=4",
        "method.beta=0.01",
        "method.sft_warmup_steps=2",
        "method.sft_warmup_lr=0.01",
        "method.lr_scale=2.0",  # big steps: the KL of step 2 is clearly > 0
        "train.max_steps=2",
        "train.eval_generate=false",
        "data.max_eval_generations=0",
        "eval.test=false",
    ]
    train(tmp_path / "full", *common, "train.save_every=1")
    full = rows_with(tmp_path / "full", "kl")
    assert len(full) == 2 and full[0]["kl"] == pytest.approx(0.0, abs=1e-6) and full[1]["kl"] > 1e-6
    assert (tmp_path / "full" / "checkpoints" / "step_1" / "reference_adapter.pt").is_file()
    train(tmp_path / "resumed", *common, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_1'}")
    resumed = rows_with(tmp_path / "resumed", "kl")
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["kl"] == pytest.approx(full[1]["kl"], rel=1e-4, abs=1e-7)  # the same reference
    assert resumed[0]["loss"] == pytest.approx(full[1]["loss"], rel=1e-4, abs=1e-7)


STEPS = 40


@pytest.mark.extended
def test_grpo_lora_with_a_kl_to_the_warm_start_learns(tmp_path):
    run = tmp_path / "grpo"
    train(
        run,
        *COMMON,
        "method=grpo",
        "method.num_prompts=1200",
        "method.num_generations=4",
        "method.lr_scale=0.5",
        "method.sft_warmup_steps=30",  # a partial warm start: room to improve
        "method.beta=0.01",
        f"train.max_steps={STEPS}",
        f"train.save_every={STEPS}",
        "data.max_eval_generations=0",
        "train.eval_generate=false",
        "eval.test=false",
    )
    values = rewards(run)
    first, last = tenths(values)
    print(f"GRPO lora beta=0.01 reward: first tenth {first:.3f} -> last tenth {last:.3f}")
    assert len(values) == STEPS and last >= 1.2 * first, (first, last)
    assert rows_with(run, "kl")[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert not (run / "sft_warmup").exists()  # no full-weight copy of the warm start
    state = json.loads((run / "checkpoints" / f"step_{STEPS}" / "rl_state.json").read_text())
    assert "sft_warmup" not in state["start_policy"]
    assert (run / "export" / "adapter_config.json").is_file()


def test_warm_adapter_swaps_local_shards_without_collectives(tmp_path):
    """An FSDP2-sharded stand-in for the adapter on a one-rank gloo group in this process (the
    2-rank GRPO test above covers sharded values and resume): swapping the warm-up adapter in and
    out launches no collective (it gathered and scattered the trained adapter on every reference
    forward before), and the forwards see the right values, also after a reload."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    from distft.methods.rl.warm_adapter import WarmAdapter

    # An in-memory store: no port, and no MASTER_* variables left behind for later tests' jobs.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        x = torch.randn(5, 6)
        warm = WarmAdapter(model)
        with torch.no_grad():
            y_warm = model(x)
            for p in model.parameters():
                p.to_local().add_(0.5)  # "training"
            y_trained = model(x)
        with CommDebugMode() as comm:
            with warm.active():
                pass
        with torch.no_grad(), warm.active():
            y_ref = model(x)
        with torch.no_grad():
            y_after = model(x)
        warm.save(tmp_path, True)
        reloaded = WarmAdapter(model)  # takes the trained values; the checkpoint's replace them
        assert reloaded.load(tmp_path)
        with torch.no_grad(), reloaded.active():
            y_reloaded = model(x)
    finally:
        torch.distributed.destroy_process_group()
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    assert not torch.allclose(y_warm, y_trained)
    torch.testing.assert_close(y_ref, y_warm, rtol=0, atol=0)
    torch.testing.assert_close(y_after, y_trained, rtol=0, atol=0)
    torch.testing.assert_close(y_reloaded, y_warm, rtol=0, atol=0)
