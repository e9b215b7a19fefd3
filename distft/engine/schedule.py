"""Learning rate as a pure function of the step, so resuming, or resuming with a new total, needs
no scheduler state.

The four schedules are transformers' (`get_scheduler`'s constant, constant_with_warmup, linear and
cosine with half a cycle), written out here: importing `transformers.optimization` pulls in its
trainer utilities, PEFT and bitsandbytes, seconds of every job's start for four formulas.
tests/test_speed_startup.py checks them against transformers' own at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor(name: str, step: int, warmup: int, total: int) -> float:
    """The multiplier of the peak LR at `step` (transformers' lr_lambda of that schedule)."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler {name!r}")


def lr_schedule(cfg, total_steps: int) -> Callable[[int], float]:
    t = cfg.train
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    if t.lr_scheduler == "constant":
        warmup = 0
    name = t.lr_scheduler
    lr_factor(name, 0, warmup, total_steps)  # an unknown name fails here, not at the first step
    return lambda step: t.lr * lr_factor(name, step, warmup, total_steps)
