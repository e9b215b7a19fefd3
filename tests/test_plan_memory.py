"""The planner's memory terms: ZeRO-3's and FSDP2's gathered buffers count the embedding and the
LM head (against DeepSpeed's own estimator on the shipped model configs), and chunked loss,
activation offloading, context and tensor parallelism change the terms they should."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distft.config.load import load_config
from distft.plan.memory import GIB, activation_bytes, estimate
from distft.plan.shape import model_shape
from distft.strategies import shipped_config

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((REPO / "docs/model_configs").iterdir())


def _shape(name_or_path: str | None = None, tuning: str = "full"):
    overrides = [f"tuning={tuning}"] + ([f"model.name_or_path={name_or_path}"] if name_or_path else [])
    return model_shape(load_config(overrides)[0])


@pytest.fixture(scope="module")
def shapes() -> dict:
    return {p.name: _shape(str(p)) for p in MODEL_CONFIGS} | {"tiny": _shape()}


def _deepspeed_largest_module(name_or_path: str) -> int:
    """DeepSpeed's `model_to_params` rule (largest module's own parameters), on a meta model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("world", [8, 64])
def test_zero3_states_and_gathered_buffers_match_deepspeeds_estimator(shapes, world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    assert len(MODEL_CONFIGS) >= 4
    for path in MODEL_CONFIGS:
        shape = shapes[path.name]
        assert shape.largest_module == _deepspeed_largest_module(str(path))
        assert shape.largest_module > shape.largest_layer / 2  # the embedding / head: the biggest module
        _, ds_total, ds_gathered = estimate_zero3_model_states_mem_needs(
            shape.params,
            shape.largest_module,
            num_gpus_per_node=world,
            cpu_offload=False,
            cpu_offload_params=False,
        )
        est = estimate(shape, "zero3", world, 1, 1024, precision="bf16", gpu=True)
        ours = est.states + est.buffers
        assert abs(ours - ds_total) <= 0.2 * ds_total, (path.name, world, ours / GIB, ds_total / GIB)
        # The gathered term alone (our buffers less the reduction bucket) is DeepSpeed's 4 B per
        # parameter of the largest module: Qwen2.5-1.5B's 0.87 GiB, not one block's 0.18 GiB.
        bucket = min(shape.hidden**2, shape.trainable) * 4.0
        assert abs(est.buffers - bucket - ds_gathered) <= 0.2 * ds_gathered, path.name


def test_fsdp2_counts_root_and_its_gradients(shapes):
    shape = shapes["qwen2.5-1.5b"]
    full = estimate(shape, "fsdp", 8, 1, 1024, precision="bf16", gpu=True)
    embed_head_bf16 = 2.0 * shape.embedding  # tied: the embedding is the head
    assert full.buffers > embed_head_bf16 + 4.0 * shape.embedding  # gathered root + its fp32 gradient


def test_loss_chunks_shrink_the_logits_share(shapes):
    shape = shapes["llama-3.1-8b"]
    kw = {"micro": 1, "seq": 8192, "act_bytes": 2.0, "checkpointing": True}
    plain = activation_bytes(shape, **kw)
    chunked = activation_bytes(shape, **kw, loss_chunks=16)
    logits = 8192 * shape.vocab * (2 + 4 + 4 + 4)
    assert plain - chunked == pytest.approx(logits * 15 / 16 - 8192 * shape.hidden * 2)
    cfg = load_config(["train.loss_chunks=16", "train.gradient_checkpointing=true"])[0]
    from distft.plan.auto import plan_one

    tiny = shapes["tiny"]
    ests = [
        plan_one(
            replace(cfg, train=replace(cfg.train, loss_chunks=c)), tiny, shipped_config("fsdp"), 2, 4, 512
        )
        for c in (0, 16)
    ]
    assert ests[1].total < ests[0].total


def test_activation_offload_moves_saved_activations_to_host_on_gpu(shapes):
    shape = shapes["llama-3.1-8b"]
    kw = {"micro": 1, "seq": 8192, "precision": "bf16", "checkpointing": True}
    base = estimate(shape, "fsdp", 8, gpu=True, **kw)
    off = estimate(shape, "fsdp", 8, gpu=True, activation_offload=True, **kw)
    moved = shape.layers * 8192 * shape.hidden * 2.0  # each block's input
    assert base.activations_ckpt - off.activations_ckpt == pytest.approx(moved)
    assert off.host_offload - base.host_offload == pytest.approx(moved)
    cpu = estimate(shape, "fsdp", 8, activation_offload=True, **kw)  # CPU: nothing moves
    assert cpu.activations_ckpt == estimate(shape, "fsdp", 8, **kw).activations_ckpt


def test_context_and_tensor_parallel_degrees(shapes):
    shape = shapes["llama-3.1-8b"]
    fsdp = shipped_config("fsdp")
    kw = {"precision": "bf16", "gpu": True}
    base = estimate(shape, fsdp, 8, 1, 32768, **kw)
    cp2 = estimate(shape, _with(fsdp, cp=2), 8, 1, 32768, **kw)
    tp2 = estimate(shape, _with(fsdp, tp=2), 8, 1, 32768, **kw)
    assert cp2.activations == pytest.approx(base.activations / 2)  # the sequence is split over cp ranks
    assert tp2.activations == pytest.approx(base.activations / 2)  # heads, MLP width and vocabulary over tp
    assert cp2.states == pytest.approx(base.states)  # FSDP2 still shards states over all 8 ranks
    assert tp2.buffers < base.buffers  # a gathered block is half a block under tp=2
    # All-gather cp keeps each layer's whole-sequence keys and values; ring and Ulysses the slice's.
    styles = {
        st: estimate(shape, _with(fsdp, cp=2, cp_style=st), 8, 1, 32768, **kw) for st in ("ring", "allgather")
    }
    assert styles["ring"].activations == pytest.approx(cp2.activations)
    kv_half = shape.layers * 32768 / 2 * 2 * (shape.kv_heads / shape.heads) * shape.hidden * 2  # bf16
    assert styles["allgather"].activations - cp2.activations == pytest.approx(kv_half)


def _with(strategy_cfg, **degrees):
    """A strategy config with cp / tp set, before or after those fields exist on it."""
    out = replace(strategy_cfg)
    for k, v in degrees.items():
        object.__setattr__(out, k, v)
    return out


def test_mesh_suggestion_prefers_cp_for_long_sequences_and_tp_for_large_models(shapes):
    from distft.plan.mesh import mesh_of, suggest_mesh

    shape, fsdp = shapes["llama-3.1-8b"], shipped_config("fsdp")
    assert str(mesh_of(fsdp, 8)) == "dp=8 × cp=1 × tp=1"

    def plan(seq):
        return lambda s: estimate(shape, s, 8, 1, seq, precision="bf16", gpu=True, checkpointing=False)

    long_seq = 65536
    base = plan(long_seq)(fsdp)
    mesh, est = suggest_mesh(plan(long_seq), fsdp, shape, 8, long_seq, 0.6 * base.total)
    assert mesh.cp > 1 and mesh.tp == 1 and est.total <= 0.6 * base.total  # activations dominate: cp
    assert mesh.dp * mesh.cp * mesh.tp == 8 and mesh.overrides() == f"strategy.cp={mesh.cp} strategy.tp=1"
    # Heads that cp does not divide (Ulysses refused by the strategy's validation): ring, same memory.
    odd = replace(shape, heads=9, kv_heads=3)
    ulysses_ok = lambda s: getattr(s, "cp_style", "ulysses") != "ulysses" or odd.heads % s.cp == 0  # noqa: E731
    found = suggest_mesh(plan(long_seq), fsdp, odd, 8, long_seq, 0.6 * base.total, ulysses_ok)
    assert found[0].cp_style == "ring" and "strategy.cp_style=ring" in found[0].overrides(), found
    big = shapes["llama-3.1-70b"]

    def plan70(s):
        return estimate(big, s, 8, 1, 1024, precision="bf16", gpu=True, checkpointing=True)

    base70 = plan70(fsdp)
    assert base70.states > base70.activations_ckpt
    found = suggest_mesh(plan70, fsdp, big, 8, 1024, base70.total - 0.4 * base70.buffers)
    assert found is not None and found[0].tp > 1 and found[0].cp == 1  # states and buffers dominate: tp
    assert suggest_mesh(plan70, fsdp, big, 8, 1024, 1.0) is None  # nothing fits 1 byte


@pytest.mark.quick
def test_expert_parallel_gathers_a_share_of_the_experts_and_keeps_the_states(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    conf = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    conf.save_pretrained(tmp_path)
    shape = _shape(str(tmp_path))
    with torch.device("meta"):
        layer = MixtralForCausalLM(conf).model.layers[0]
    assert shape.expert_block == layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
    fsdp = shipped_config("fsdp")
    base, ep4 = (estimate(shape, _with(fsdp, ep=ep), 8, 2, 256) for ep in (1, 4))
    assert (ep4.params, ep4.grads, ep4.optimizer) == (base.params, base.grads, base.optimizer)  # 1/8 each
    # two gathered blocks and a block's fp32 gradients: 3/4 of the routed experts are not gathered
    saved = shape.expert_block * 3 / 4 * (2 * 4.0 + 4.0)
    assert base.buffers - ep4.buffers == pytest.approx(saved)
