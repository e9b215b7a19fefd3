"""FSDP2: `fully_shard` on every decoder layer, then the root, with a mixed-precision policy, over
the data-parallel dims of one device mesh (distft.parallel.mesh) that also carries context (cp)
and tensor (tp) parallelism."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from distft.dtypes import PRECISION_DTYPES
from distft.errors import ConfigError
from distft.models.layers import decoder_layers
from distft.parallel import mesh as meshes
from distft.ranges import num
from distft.strategies.memory import States, fully_sharded
from distft.strategies.torch_native import TorchNativeStrategy


@dataclass
class MeshDims:
    """The model-parallel dimensions of the FSDP2 family's device mesh (under hsdp, inside a shard group)."""

    cp: int = num(1, ge=1)
    """Context-parallel degree: each sequence split over this many ranks (they share one batch share)."""
    cp_style: Literal["ulysses", "allgather", "ring"] = "ulysses"
    """Context parallelism: ulysses (all-to-all of heads; needs heads % cp == 0), allgather (each rank
    attends over all-gathered whole-sequence keys/values; any head count) or ring (key/value blocks passed
    round the cp ranks; no rank holds the whole sequence's; any head count)."""
    tp: int = num(1, ge=1)
    """Tensor-parallel degree: attention and MLP projections split over this many ranks."""
    tp_sequence_parallel: bool = True
    """With tp > 1: norms and the residual stream split by sequence over the tp ranks (less activation
    memory; a block's input is all-gathered, its output reduce-scattered)."""
    ep: int = num(1, ge=1)
    """Expert-parallel degree (MoE models): experts split over this many ranks, tokens sent by all-to-all."""


@dataclass
class FsdpConfig(MeshDims):
    name: str = "fsdp"
    """Strategy."""
    reshard_after_forward: bool = True
    """Free gathered layer weights after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."""


config = FsdpConfig
loads_sharded = True  # the model may come on the meta device; each rank reads only its shards


def validate(cfg, gpu: bool) -> None:
    if cfg.train.precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 is not supported with strategy=fsdp (FSDP2 gradients need a "
            "sharded loss scaler); use train.precision=bf16, or fp16 with strategy=ddp or "
            "zero1/zero2/zero3 on GPU"
        )
    check_mesh(cfg, gpu)


# SFT's loss is a sum over a slice's tokens; DPO, KTO and the RL methods' losses read whole rows
# (distft.parallel.cp: the model splits them and gathers the logits).
CP_METHODS = ("sft", "dpo", "kto", "grpo", "ppo")


def check_mesh(cfg, gpu: bool, world: int | None = None) -> None:
    """strategy.cp / tp: the mesh fits the job and the model, before any rank starts."""
    s = cfg.strategy
    cp, tp = meshes.degrees(s)
    if world is None:  # a rank knows its job's size; the launcher plans cluster.nodes × nproc_per_node
        world = int(os.environ.get("WORLD_SIZE") or cfg.cluster.nodes * cfg.cluster.nproc_per_node)
    if cp * tp > 1 and world:
        meshes.check_world(world, cp, tp)
    if tp > 1:
        from distft.parallel.tp import validate as validate_tp

        validate_tp(cfg, world)
    check_ep(cfg, world)
    if cp == 1:
        return
    if cfg.method.name not in CP_METHODS:
        raise ConfigError(
            f"strategy.cp={cp} works with method={', '.join(CP_METHODS)} (not yet method={cfg.method.name}); "
            "set strategy.cp=1"
        )
    heads = _heads(cfg)
    if s.cp_style == "ulysses" and heads and heads % cp:
        raise ConfigError(
            f"strategy.cp={cp} with cp_style=ulysses needs the attention heads ({heads}) divisible by cp; "
            f"pick a divisor of {heads}"
        )
    if tp > 1 and heads and heads % (tp * (cp if s.cp_style == "ulysses" else 1)):
        raise ConfigError(f"strategy.tp={tp}: the model's {heads} attention heads are not divisible by it")
    if cfg.method.name != "sft" and cfg.train.loss_chunks:
        raise ConfigError(
            f"strategy.cp={cp} with method={cfg.method.name} gathers whole rows' logits; "
            "train.loss_chunks applies to method=sft only under cp: set train.loss_chunks=0"
        )
    if cfg.model.attn_implementation != "sdpa":
        raise ConfigError(
            f"strategy.cp={cp} replaces the attention kernel with its {s.cp_style} attention; "
            f"set model.attn_implementation=sdpa (got {cfg.model.attn_implementation})"
        )
    if cfg.train.compile:
        raise ConfigError(
            f"strategy.cp={cp} is not verified with train.compile=true; set train.compile=false"
        )


EP_TUNINGS = ("full", "lora")
EP_METHODS = ("sft", "dpo")


def check_ep(cfg, world: int, ep: int | None = None) -> None:
    """strategy.ep (or `ep`): an MoE model whose experts and ranks it divides, full or LoRA tuning
    (LoRA: at least 2 experts a rank), no cp/tp."""
    ep = ep or meshes.ep_degree(cfg.strategy)
    if ep == 1:
        return
    cp, tp = meshes.degrees(cfg.strategy)
    if cp * tp > 1:
        raise ConfigError(
            f"strategy.ep={ep} is not yet combined with strategy.cp/tp; set strategy.cp=1 strategy.tp=1"
        )
    if cfg.tuning.name not in EP_TUNINGS:
        raise ConfigError(
            f"strategy.ep={ep} works with tuning={'|'.join(EP_TUNINGS)} (not yet tuning={cfg.tuning.name}); "
            "set strategy.ep=1"
        )
    if cfg.method.name not in EP_METHODS:
        raise ConfigError(
            f"strategy.ep={ep} is verified for method={'|'.join(EP_METHODS)} only, "
            f"not method={cfg.method.name}; set strategy.ep=1"
        )
    if world and world % ep:
        raise ConfigError(f"strategy.ep={ep} does not divide the world size {world}; pick a divisor of it")
    from distft.models import expert_parallel

    config = _model_config(cfg)
    name = cfg.model.name_or_path or f"model={cfg.model.name}"
    if config is not None:  # a hub id: checked when the model is built
        lora = cfg.tuning.name == "lora"
        expert_parallel.check(ep, world or ep, expert_parallel.num_experts(config), name, lora=lora)


def _model_config(cfg) -> dict | None:
    """The configured model's config.json as a dict ({} for the dense tiny model; None for a hub id)."""
    from pathlib import Path

    path = cfg.model.name_or_path
    if not path:
        return {}
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    import json

    data = json.loads(config.read_text())
    return data.get("text_config", data)


def _heads(cfg) -> int | None:
    """Attention heads of the configured model (the tiny model's key, or a local config.json)."""
    if not cfg.model.name_or_path:
        return int(cfg.model.num_heads)
    data = _model_config(cfg)
    if data is None:
        return None  # a hub id: checked when the model is built (distft.parallel.cp)
    return data.get("num_attention_heads")


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    if tuning == "prefix":
        # Checked with 2 ranks against DDP on the same global batch: the prefix encoder lives in
        # the PEFT wrapper, outside the sharded transformer, so its gradients are not reduced
        # across ranks (step-1 grad norm 0.056 vs DDP's 0.043).
        return "the prefix encoder is not sharded with the model"
    return None


def memory(shape, strategy_cfg, job) -> States:
    return fully_sharded(shape, job, max(job.world, 1))


def parallelize(model: torch.nn.Module, cfg, info, mesh, shape: meshes.MeshShape) -> torch.nn.Module:
    """Tensor parallelism on mesh["tp"] first (it replaces the projections' weights by DTensor
    shards), expert parallelism next (experts split over ep ranks, then FSDP2-sharded over their
    copies), then FSDP2 over the data-parallel dims (dp_shard × cp, and replicas for HSDP)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if shape.tp > 1:  # the one place tensor parallelism is applied (distft.parallel.tp)
        from distft.parallel.tp import apply_tp

        apply_tp(model, mesh["tp"], cfg)
    mp = None
    if cfg.train.precision != "fp32":
        mp = MixedPrecisionPolicy(
            param_dtype=PRECISION_DTYPES[cfg.train.precision], reduce_dtype=torch.float32
        )
    kwargs = {
        "mesh": meshes.fsdp_mesh(mesh, shape),
        "reshard_after_forward": cfg.strategy.reshard_after_forward,
    }
    if mp is not None:
        kwargs["mp_policy"] = mp
    # The root is the transformers model itself, not a PEFT wrapper: generate() is called on it
    # directly, and its forward hooks must gather the embedding and head.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if shape.ep > 1:  # the one place expert parallelism is applied (distft.models.expert_parallel)
        from distft.models.expert_parallel import shard_experts

        experts_mesh = meshes.expert_mesh(mesh.device_type, shape)
        efsdp = meshes.experts_fsdp_mesh(experts_mesh, shape)
        policy = {k: v for k, v in kwargs.items() if k != "mesh"}
        shard_experts(root, experts_mesh["ep"], mesh["tp"], efsdp, shape.dp, **policy)
    else:  # expert LoRA in the layout ep > 1 splits: checkpoints reshard across ep
        from distft.models.expert_parallel import stack_experts_lora

        stack_experts_lora(root)
    for layer in decoder_layers(root):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return model


def make(cfg, info) -> TorchNativeStrategy:
    # The mixed-precision policy casts parameters, so no autocast on top.
    check_mesh(cfg, info.device.type == "cuda", info.world_size)
    shape = meshes.shape_for(info.world_size, cfg.strategy)
    return TorchNativeStrategy(cfg, info, parallelize, sharded=True, autocast=False, shape=shape)
