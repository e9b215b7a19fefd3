"""The engine's held-out loss: a whole split through the method's loss, sharded over ranks."""

from __future__ import annotations

import math

import torch

from distft.runtime import dist
from distft.strategies.step import add_parts, reduce_parts, to_device


@torch.no_grad()
def held_out_loss(method, strategy, examples: list, info, micro: int, prefix: str = "eval/") -> dict:
    """`{prefix}loss` (normalized by the split's target tokens), `{prefix}ppl` and the method's
    loss metrics over `examples`; every rank runs the same number of forwards."""
    if not examples:
        return {}
    mine = examples[info.dp_rank :: info.dp_size]  # [tp] a replica's ranks see the same rows
    n_batches = math.ceil(math.ceil(len(examples) / info.dp_size) / micro)
    model = strategy.model
    was_training = model.training
    model.eval()
    loss_sum, targets = 0.0, 0.0
    extra: dict[str, list[float]] = {}
    for b in range(n_batches):
        rows = mine[b * micro : (b + 1) * micro]
        # Sharded parameters need every rank in every forward: idle ranks run a dummy batch.
        batch = to_device(method.collate(rows or examples[:1]), info.device)
        with strategy.accumulate(True):
            loss, parts = method.loss(model, batch)
        if rows:
            loss_sum += float(loss)
            targets += batch["num_targets"]
            add_parts(extra, parts)
    model.train(was_training)
    loss_sum, targets = dist.all_reduce_sum([loss_sum, targets], info.device)
    mean = loss_sum / max(targets, 1.0)
    out = {f"{prefix}loss": mean, f"{prefix}ppl": math.exp(min(mean, 50.0))}
    out.update({f"{prefix}{k}": v for k, v in reduce_parts(extra, info.device).items()})
    return out
