"""One optimizer step under any strategy, and the batch geometry it runs on.

`optimizer_step` is the only place that turns micro-batch losses into an update: the SFT-style
step of every supervised method, the PPO / GRPO updates (and PPO's critic), the RL methods' SFT
warm-up and the planner's micro-batch trial all call it. Each loss is a sum over its
micro-batch's targets; the step normalizes by the targets of all micro-batches on all ranks and
applies the strategy's scale rule (`strategy.loss_scale`: how its gradient reduction averages),
so the update does not depend on the world size or the accumulation steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from distft.contracts import BatchGeometry, StepResult
from distft.runtime import dist
from distft.strategies.offload import activation_offload

__all__ = [
    "BatchGeometry",
    "LossFn",
    "StepResult",
    "add_parts",
    "optimizer_step",
    "reduce_parts",
    "to_device",
]

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
"""(model, batch) -> (summed loss over the batch's targets, {metric: (sum, count)})."""


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def add_parts(acc: dict[str, list[float]], parts: dict) -> None:
    """Metrics come as {name: (sum, count)}; summed here, averaged after the all-reduce."""
    for k, (total, count) in parts.items():
        a = acc.setdefault(k, [0.0, 0.0])
        a[0] += float(total)
        a[1] += float(count)


def reduce_parts(acc: dict[str, list[float]], device) -> dict[str, float]:
    """Means over all ranks of accumulated (sum, count) pairs, in one collective."""
    keys = sorted(acc)
    flat = dist.all_reduce_sum([x for k in keys for x in acc[k]], device) if keys else []
    return {k: flat[2 * i] / max(flat[2 * i + 1], 1e-12) for i, k in enumerate(keys)}


def optimizer_step(
    strategy,
    batches: list[dict],
    loss_fn: LossFn,
    device,
    lr: float | None,
    *,
    reduce_metrics: bool = True,
    trial: bool = False,
    loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """Forward/backward over this rank's `batches` (each with `num_targets`, optionally
    `num_tokens`), then the strategy's step. `trial`: backward of a zero-scaled loss and no step
    (the planner's memory probe leaves exact-zero gradients). `loss_hook` sees each micro-batch's
    loss before backward (fault injection)."""
    batches = [strategy.shard_batch(b) for b in batches]  # context parallelism: this rank's slices
    local_targets = sum(float(b["num_targets"]) for b in batches)
    local_tokens = sum(b.get("num_tokens", 0) for b in batches)
    global_targets, global_tokens = dist.all_reduce_sum([local_targets, local_tokens], device)
    scale = 0.0 if trial else strategy.loss_scale / max(global_targets, 1.0)
    if lr is not None:
        strategy.set_lr(lr)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    parts: dict[str, list[float]] = {}
    for i, batch in enumerate(batches):
        is_last = i == len(batches) - 1
        batch = to_device(batch, device)
        with strategy.accumulate(is_last), strategy.split(batch):
            offload = activation_offload(strategy)  # train.activation_offload; backward unpacks
            with offload or contextlib.nullcontext():
                loss, extra = loss_fn(strategy.model, batch)
            if offload is not None:
                extra = {**extra, **offload.parts()}
            if loss_hook is not None:
                loss = loss_hook(loss)
            strategy.backward(loss * scale, is_last)
        loss_sum += loss.detach().double()
        add_parts(parts, extra)
    if trial:
        return StepResult(float(loss_sum), int(global_tokens), float("nan"), parts=parts)
    grad_norm = strategy.step()
    metrics = reduce_parts(parts, device) if reduce_metrics else {}
    (total,) = dist.all_reduce_sum([float(loss_sum)], device)
    return StepResult(total / max(global_targets, 1.0), int(global_tokens), grad_norm, metrics, parts)
