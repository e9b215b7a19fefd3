"""`strategy=auto` and `train.micro_batch_size=auto`: choices made from the memory estimate.

The strategy is resolved while the config loads (every rank and the launcher make the same,
deterministic choice from the config and the node's total memory). The micro-batch is estimated in
Trainer.build from the longest encoded example, then confirmed by a trial forward/backward on the
longest examples with the real strategy (its peak memory is measured; it halves until it fits).
"""

from __future__ import annotations

import math
import os
from dataclasses import fields, replace

import torch

from distft.errors import ConfigError
from distft.parallel.mesh import degrees
from distft.plan.memory import GIB, Estimate, estimate
from distft.plan.shape import ModelShape, model_shape
from distft.strategies import AUTO_ORDER, PLANNED, STRATEGIES, shipped_config
from distft.strategies.step import BatchGeometry, optimizer_step

MICRO_CANDIDATES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
HEADROOM = 0.9  # an estimate must fit in 90% of the budget


def world_size(cfg) -> int:
    """Ranks of the job: the launcher's WORLD_SIZE inside a rank, else the cluster config."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    c = cfg.cluster
    per_node = c.nproc_per_node or c.gpus_per_node or 1
    if c.gpus_per_node > 0:
        per_node = min(per_node, c.gpus_per_node)
    return max(1, c.nodes * per_node)


def ranks_per_node(cfg) -> int:
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return max(1, world_size(cfg) // max(cfg.cluster.nodes, 1))


def budget(cfg) -> tuple[float, str]:
    """Memory one rank may use, in bytes, and where the number comes from."""
    if cfg.train.memory_gib:
        return cfg.train.memory_gib * GIB, "train.memory_gib"
    if cfg.cluster.gpus_per_node > 0:
        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
        return 80.0 * GIB, "assumed 80 GiB GPUs (set train.memory_gib)"
    import psutil

    per_rank = psutil.virtual_memory().total / ranks_per_node(cfg)
    return per_rank, f"host RAM / {ranks_per_node(cfg)} ranks per node"


def strategy_config(name: str):
    """The shipped option's block (conf/strategy/<name>.yaml) as its typed dataclass."""
    return shipped_config(name)


def plan_one(cfg, shape: ModelShape, strategy_cfg, world: int, micro: int, seq: int) -> Estimate:
    from distft.tuning import TUNINGS

    return estimate(
        shape,
        strategy_cfg,
        world,
        micro,
        seq,
        precision=cfg.train.precision,
        tuning=cfg.tuning.name,
        adapter=TUNINGS[cfg.tuning.name].adapter,
        checkpointing=cfg.train.gradient_checkpointing,
        gpu=cfg.cluster.gpus_per_node > 0,
        ranks_per_node=ranks_per_node(cfg),
        loss_chunks=cfg.train.loss_chunks,
        activation_offload=cfg.train.activation_offload,
    )


def usable(cfg, s) -> bool:
    """Whether strategy config `s` may run this job: its option's own validate (mesh degrees
    included) and whether it supports the tuning mode."""
    option = STRATEGIES[s.name]
    try:
        option.validate(replace(cfg, strategy=s), cfg.cluster.gpus_per_node > 0)
    except ConfigError:
        return False
    return option.supports_tuning(cfg.tuning.name, s) is None


def valid_strategies(cfg) -> list:
    """Shipped strategies this config may use, fastest first."""
    return [s for s in map(strategy_config, AUTO_ORDER) if usable(cfg, s)]


def _micro_for_planning(cfg) -> int:
    m = cfg.train.micro_batch_size
    return 1 if m == "auto" else int(m)


def fields_of(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def pick_strategy(cfg, shape: ModelShape, world: int, seq: int) -> tuple[object, list[Estimate]]:
    """The first strategy in AUTO_ORDER whose estimate fits; when none does, the smallest context /
    tensor-parallel mesh of the first meshed strategy (fsdp) that fits and the job can run."""
    limit, source = budget(cfg)
    estimates = []
    for s in valid_strategies(cfg):
        e = plan_one(cfg, shape, s, world, _micro_for_planning(cfg), seq)
        estimates.append(e)
        if e.total <= HEADROOM * limit:
            return s, estimates
    meshed = next((n for n in AUTO_ORDER if {"cp", "tp"} <= set(fields_of(STRATEGIES[n].config))), None)
    if meshed is not None:
        from distft.plan.mesh import suggest_mesh, with_degrees

        micro = _micro_for_planning(cfg)
        found = suggest_mesh(
            lambda s: plan_one(cfg, shape, s, world, micro, seq), strategy_config(meshed), shape, world, seq,
            HEADROOM * limit, lambda s: usable(cfg, s),
        )  # fmt: skip
        if found:
            mesh, est = found
            chosen = with_degrees(strategy_config(meshed), mesh.cp, mesh.tp, mesh.cp_style)
            return chosen, [*estimates, est]
    smallest = min(estimates, key=lambda e: e.total)
    raise ConfigError(
        f"strategy=auto: no strategy fits {limit / GIB:.1f} GiB per rank ({source}) at {world} ranks, with "
        f"or without context/tensor parallelism; the smallest estimate is {smallest.total / GIB:.1f} GiB "
        f"({smallest.strategy}). Add ranks, set train.gradient_checkpointing=true, use tuning=lora or qlora, "
        "or lower train.micro_batch_size"
    )


def describe(strategy_cfg, world: int) -> str:
    """The choice as a user would write it, with its mesh when it has one."""
    from distft.plan.mesh import mesh_of

    cp, tp = degrees(strategy_cfg)
    if cp * tp == 1:
        return f"strategy={strategy_cfg.name}"
    mesh = mesh_of(strategy_cfg, world)
    return f"strategy={strategy_cfg.name} {mesh.overrides()} (mesh {mesh})"


def pick_micro(cfg, shape: ModelShape, world: int, seq: int, max_micro: int | None = None) -> int:
    limit, source = budget(cfg)
    best = 0
    for micro in MICRO_CANDIDATES:
        if max_micro is not None and micro > max_micro:
            break
        if plan_one(cfg, shape, cfg.strategy, world, micro, seq).total > HEADROOM * limit:
            break
        best = micro
    if best == 0:
        e = plan_one(cfg, shape, cfg.strategy, world, 1, seq)
        raise ConfigError(
            f"train.micro_batch_size=auto: even a micro-batch of 1 needs about {e.total / GIB:.2f} GiB per "
            f"rank with strategy={cfg.strategy.name}, more than {limit / GIB:.2f} GiB ({source}); use a "
            "sharded strategy (strategy=auto), gradient checkpointing or more ranks"
        )
    return best


def resolve_strategy(cfg):
    """A config whose strategy=auto is replaced by the planner's choice (other configs unchanged)."""
    if cfg.strategy.name != PLANNED:
        return cfg
    shape = model_shape(cfg)
    world = world_size(cfg)
    chosen, _ = pick_strategy(cfg, shape, world, cfg.data.max_length)
    if os.environ.get("RANK", "0") == "0" and math.prod(degrees(chosen)) > 1:
        # Only a meshed choice is announced: no data-parallel strategy fits, so the job changes shape.
        print(
            f"distft: strategy=auto: no data-parallel strategy fits; chose {describe(chosen, world)}",
            flush=True,
        )
    return replace(cfg, strategy=chosen)


def estimate_micro_batch(cfg, examples: list[dict], world: int) -> int:
    """train.micro_batch_size=auto: the largest candidate whose estimate fits, for the longest
    example, capped so one global batch fits in the train split."""
    seq = max((len(ex["input_ids"]) for ex in examples if "input_ids" in ex), default=cfg.data.max_length)
    cap = max(1, len(examples) // BatchGeometry(1, cfg.train.grad_accum, world).unit)
    return pick_micro(cfg, model_shape(cfg), world, seq, max_micro=cap)


def trial_batch(method, examples: list[dict], micro: int) -> dict:
    """A worst-case micro-batch: the longest examples (repeated when there are fewer)."""
    ranked = sorted(examples, key=lambda ex: -len(ex.get("input_ids", ())))
    rows = [ranked[i % len(ranked)] for i in range(micro)]
    return method.collate(rows)


def confirm_micro_batch(
    cfg, info, method, strategy, examples: list[dict], run_dir=None, limit: float | None = None
) -> dict:
    """Run forward/backward on the worst-case micro-batch with the real strategy; halve the
    micro-batch until every rank's peak memory, plus the optimizer state the first step has yet to
    allocate, fits HEADROOM (90%) of the budget (GPU: or it stops running out of memory). The 10%
    left covers what the trial cannot see: the allocator's fragmentation and cache beyond the
    allocated peak, the CUDA context, NCCL buffers. The loss is scaled by zero, so the gradients it
    leaves are exact zeros. `limit`: the budget in bytes (default: budget(cfg))."""
    from distft.perf.mfu import peak_memory_gib
    from distft.runtime import dist

    limit = budget(cfg)[0] if limit is None else limit
    usable = HEADROOM * limit
    optim = pending_optimizer_bytes(strategy, info.device)
    micro = int(cfg.train.micro_batch_size)
    tried = []
    while True:
        ok, peak = _trial(info, method, strategy, examples, micro, peak_memory_gib)
        fits = ok and peak * GIB + optim <= usable
        all_fit = min(dist.all_gather_objects(bool(fits)))
        tried.append({"micro": micro, "peak_gib": peak, "optimizer_gib": optim / GIB, "fits": bool(all_fit)})
        if all_fit or micro == 1:
            break
        micro //= 2
    cfg.train.micro_batch_size = micro
    strategy.end_trial(micro)  # drop the trial's gradients; record the micro-batch
    record = {
        "micro_batch_size": micro,
        "trials": tried,
        "budget_gib": limit / GIB,
        "usable_gib": usable / GIB,
    }
    if info.is_main:
        print(f"distft: train.micro_batch_size=auto → {micro} (trial steps: {tried})", flush=True)
        if run_dir is not None:
            import json
            from pathlib import Path

            (Path(run_dir) / "plan.json").write_text(json.dumps(record, indent=2))
    return record


def pending_optimizer_bytes(strategy, device: torch.device) -> int:
    """Optimizer state on `device` that the first step will allocate: torch's AdamW creates
    exp_avg and exp_avg_sq (each the size and dtype of this rank's shard of the parameter) at its
    first step, after the trial. DeepSpeed's ZeRO optimizers create theirs at setup, so it is in
    the trial's peak already (and offloaded state is not on the device)."""
    opt = getattr(strategy, "base_optimizer", None) or getattr(strategy, "optimizer", None)
    if opt is None:
        return 0
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if opt.state.get(p):
                continue
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            if local.device.type == device.type:
                total += 2 * local.numel() * local.element_size()
    return total


def _trial(info, method, strategy, examples, micro, peak_memory_gib) -> tuple[bool, float]:
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    try:
        batch = trial_batch(method, examples, micro)
        optimizer_step(strategy, [batch], method.loss, info.device, None, trial=True)
        del batch
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False, float("inf")
    return True, peak_memory_gib(info.device)
