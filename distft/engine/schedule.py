"""Learning rate as a pure function of the step (transformers' schedules), so resuming, or
resuming with a new total, needs no scheduler state."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lr_schedule(cfg, total_steps: int) -> Callable[[int], float]:
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    if t.lr_scheduler == "constant":
        warmup = 0
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    sched = get_scheduler(t.lr_scheduler, holder, num_warmup_steps=warmup, num_training_steps=total_steps)
    factor = sched.lr_lambdas[0]
    return lambda step: t.lr * factor(step)
