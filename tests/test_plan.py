"""The memory planner: shapes from the meta device, estimates against the ZeRO formula and
DeepSpeed's own estimators, the auto choices, distft-plan, and an auto run equal to its explicit
twin (the trial step leaves no trace in training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError
from distft.plan import auto, estimate, model_shape
from distft.plan.memory import GIB, STRATEGY_ORDER
from tests.util import REPO, env, metrics, train, train_losses

MEDIUM = [  # ~3.2M parameters: model states big enough to separate the strategies
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.intermediate_size=768",
]
BIG = ["model.hidden_size=768", "model.num_layers=10", "model.num_heads=12", "model.num_kv_heads=12"]
BIG += ["model.intermediate_size=2048"]  # ~71M parameters


def cfg_for(*overrides):
    return load_config(list(overrides))[0]


def real_model(cfg):
    from transformers import AutoModelForCausalLM

    from distft.plan.shape import model_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(cfg))


@pytest.mark.quick
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_meta_shape_counts_what_the_real_model_has(tuning):
    from distft.tuning import TUNINGS

    cfg = cfg_for(*MEDIUM, f"tuning={tuning}")
    shape = model_shape(cfg)
    model = TUNINGS[tuning].apply(real_model(cfg), cfg)
    params = {id(p): p for p in model.parameters()}.values()
    assert shape.params == sum(p.numel() for p in params)
    assert shape.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert shape.layers == 4 and shape.hidden == 256
    layer = model.get_base_model().model.layers[0] if tuning == "lora" else model.model.layers[0]
    assert shape.largest_layer == sum(p.numel() for p in layer.parameters()) or tuning == "lora"


@pytest.mark.quick
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sharded_states_match_the_zero_formula(n):
    """fp32 FSDP2 and ZeRO-3 shard weights, gradients and Adam: exactly 16Ψ/N of model states per
    rank (ZeRO-3's fp32 master is the model's own partition, shared by distft)."""
    shape = model_shape(cfg_for(*BIG))
    for strategy in ("fsdp", "zero3"):
        e = estimate(shape, strategy, n, micro=1, seq=64)
        assert e.states == pytest.approx(16 * shape.params / n), strategy
    ddp = estimate(shape, "ddp", n, micro=1, seq=64)
    assert ddp.states == pytest.approx(16 * shape.params)


@pytest.mark.quick
@pytest.mark.parametrize("n", [2, 4, 8])
def test_states_agree_with_deepspeeds_estimators(n):
    """bf16 mixed precision on GPUs, no offload: our ZeRO-2/3 model states within 15% of
    DeepSpeed's estimate_zero{2,3}_model_states_mem_needs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = model_shape(cfg_for(*BIG))
    _, ds2 = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=n, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer, num_gpus_per_node=n, cpu_offload=False, cpu_offload_params=False
    )
    ours2 = estimate(shape, "zero2", n, 1, 64, precision="bf16", gpu=True)
    ours3 = estimate(shape, "zero3", n, 1, 64, precision="bf16", gpu=True)
    assert ours2.states == pytest.approx(ds2, rel=0.15)
    assert ours3.states + 2 * shape.largest_layer * 2 == pytest.approx(ds3, rel=0.15)


@pytest.mark.quick
def test_activations_grow_with_the_batch_and_checkpointing_cuts_them():
    shape = model_shape(cfg_for(*MEDIUM))
    a1 = estimate(shape, "ddp", 2, micro=4, seq=64)
    a2 = estimate(shape, "ddp", 2, micro=8, seq=64)
    assert a2.activations == pytest.approx(2 * a1.activations)
    assert a1.activations_ckpt < a1.activations / 2
    ckpt = estimate(shape, "ddp", 2, micro=4, seq=64, checkpointing=True)
    assert ckpt.total == pytest.approx(a1.total - a1.activations + a1.activations_ckpt)


@pytest.mark.quick
def test_qlora_keeps_4bit_weights():
    full = model_shape(cfg_for(*BIG, "tuning=lora"))
    q = estimate(full, "ddp", 1, 1, 64, precision="bf16", tuning="qlora", adapter=True)
    lora = estimate(full, "ddp", 1, 1, 64, precision="bf16", tuning="lora", adapter=True)
    assert q.params < 0.35 * lora.params  # 4.1 bits vs 16 bits for the linear weights


@pytest.mark.quick
def test_auto_picks_the_fastest_strategy_that_fits():
    base = [*BIG, "train.micro_batch_size=4", "data.max_length=32"]
    cfg = cfg_for(*base)
    shape = model_shape(cfg)
    est = {s.name: auto.plan_one(cfg, shape, s, 2, 4, 32).total for s in auto.valid_strategies(cfg)}
    assert list(est) == STRATEGY_ORDER
    for target in ("zero1", "zero2", "fsdp"):
        i = STRATEGY_ORDER.index(target)
        faster = min(est[s] for s in STRATEGY_ORDER[:i])
        if est[target] >= faster:
            continue  # never the pick: a faster one is also smaller
        budget_gib = (est[target] + min(faster, est[target] * 1.05)) / 2 / auto.HEADROOM / GIB
        chosen, _ = auto.pick_strategy(cfg_for(*base, f"train.memory_gib={budget_gib}"), shape, 2, 32)
        assert est[chosen.name] <= auto.HEADROOM * budget_gib * GIB
        assert all(
            est[s] > auto.HEADROOM * budget_gib * GIB
            for s in STRATEGY_ORDER[: STRATEGY_ORDER.index(chosen.name)]
        )


@pytest.mark.quick
def test_strategy_auto_resolves_while_loading(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    typed, composed = load_config([*BIG, "strategy=auto", "train.memory_gib=1.9", "train.micro_batch_size=4"])
    assert typed.strategy.name in ("zero1", "zero2", "fsdp", "zero3")  # ddp (~2.2 GiB) does not fit
    assert composed.strategy.name == typed.strategy.name  # config.yaml records the choice
    with pytest.raises(ConfigError, match="no strategy fits"):
        load_config([*BIG, "strategy=auto", "train.memory_gib=0.5"])


@pytest.mark.quick
def test_micro_batch_estimate_is_the_largest_that_fits():
    cfg = cfg_for(*BIG, "strategy=fsdp", "train.memory_gib=2.0")
    shape = model_shape(cfg)
    micro = auto.pick_micro(cfg, shape, 2, 64)
    fits = lambda m: auto.plan_one(cfg, shape, cfg.strategy, 2, m, 64).total <= auto.HEADROOM * 2 * GIB  # noqa: E731
    assert micro >= 1 and fits(micro) and not fits(2 * micro)
    with pytest.raises(ConfigError, match="even a micro-batch of 1"):
        auto.pick_micro(cfg_for(*BIG, "strategy=ddp", "train.memory_gib=1.0"), shape, 2, 64)


@pytest.mark.quick
def test_distft_plan_prints_the_table_and_the_pick():
    cmd = [sys.executable, "-m", "distft.plan.cli", *BIG, "strategy=auto", "train.memory_gib=1.9"]
    cmd += ["train.micro_batch_size=4", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env(WORLD_SIZE="2"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.strip().splitlines()[-1])  # libraries may print before it
    assert {r["strategy"] for r in plan["rows"]} == set(STRATEGY_ORDER)
    assert {r["world"] for r in plan["rows"]} >= {1, 2, 4, 8}
    assert plan["recommended"] in ("zero1", "zero2", "fsdp", "zero3")  # not ddp: it does not fit
    text = subprocess.run(cmd[:-1], cwd=REPO, env=env(WORLD_SIZE="2"), capture_output=True, text=True)
    assert f"recommended at 2 ranks: strategy={plan['recommended']}" in text.stdout


@pytest.mark.slow
def test_auto_run_equals_the_explicit_run(tmp_path):
    """strategy=auto and micro_batch_size=auto train exactly like the choices written out, so
    the trial step leaves nothing behind (gradients, optimizer state, data order)."""
    common = [*MEDIUM, "train.max_steps=3", "train.eval_generate=false", "train.export=none"]
    budget = "train.memory_gib=3"
    train(tmp_path / "auto", *common, "strategy=auto", "train.micro_batch_size=auto", budget)
    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    micro = plan["micro_batch_size"]
    assert micro >= 1 and plan["trials"][-1]["fits"]
    chosen = (tmp_path / "auto" / "config.yaml").read_text().split("strategy:\n  name: ")[1].split()[0]
    assert chosen in STRATEGY_ORDER
    train(tmp_path / "explicit", *common, f"strategy={chosen}", f"train.micro_batch_size={micro}")
    a, b = train_losses(tmp_path / "auto"), train_losses(tmp_path / "explicit")
    assert a.keys() == b.keys() == {1, 2, 3}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
    assert metrics(tmp_path / "auto")[-1]["step"] == 3


@pytest.mark.quick
def test_strategy_auto_chooses_a_context_parallel_mesh_when_only_that_fits(monkeypatch, capsys):
    """Long sequences that no data-parallel strategy fits: auto picks fsdp with cp itself, says so,
    and config.yaml records the mesh; a budget nothing fits is still one clear line."""
    from distft.plan.mesh import with_degrees

    monkeypatch.setenv("WORLD_SIZE", "2")
    base = [*BIG, "data.max_length=4096", "train.micro_batch_size=2"]
    cfg = cfg_for(*base)
    shape = model_shape(cfg)
    fsdp = auto.strategy_config("fsdp")
    plain = min(auto.plan_one(cfg, shape, s, 2, 2, 4096).total for s in auto.valid_strategies(cfg))
    cp2 = auto.plan_one(cfg, shape, with_degrees(fsdp, 2, 1), 2, 2, 4096).total
    assert cp2 < plain
    budget_gib = (cp2 + plain) / 2 / auto.HEADROOM / GIB  # between the two
    typed, composed = load_config([*base, "strategy=auto", f"train.memory_gib={budget_gib}"])
    assert (typed.strategy.name, typed.strategy.cp, typed.strategy.tp) == ("fsdp", 2, 1)
    assert (composed.strategy.name, composed.strategy.cp) == ("fsdp", 2)  # config.yaml records it
    out = capsys.readouterr().out
    assert "chose strategy=fsdp strategy.cp=2 strategy.tp=1 (mesh dp=1 × cp=2 × tp=1)" in out
    with pytest.raises(ConfigError, match="with or without context/tensor parallelism") as e:
        load_config([*base, "strategy=auto", f"train.memory_gib={cp2 / 4 / GIB}"])
    assert "\n" not in str(e.value)
