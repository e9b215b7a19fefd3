"""Non-finite guard: a step whose loss (all-reduced, so every rank sees the same value) or global
gradient norm is NaN/Inf is skipped (the strategies do not apply a non-finite update) and counted;
after train.max_bad_steps such steps in a row, training stops with what is needed to debug it.

Fault injection (tests, and users checking their own setup): the environment variable
DISTFT_FAULT_NAN_STEPS="3,5,6" (optionally "@<rank>", e.g. "3,5@1") turns the loss of those
steps into NaN on that rank (all ranks without "@") before backward, so the NaN travels through
the real backward and gradient reduction. It is read only here and does nothing when unset.

DISTFT_FAULT_SLEEP="<step>:<seconds>[@<rank>]" stalls that rank (all without "@") for that long
before the 1-based step: a slow or stuck rank, for checking the hang stack dumps
(cluster.hang_dump_s) on a real job.
"""

from __future__ import annotations

import math
import os
import time

import torch

from distft.errors import DistftError

FAULT_ENV = "DISTFT_FAULT_NAN_STEPS"
SLEEP_ENV = "DISTFT_FAULT_SLEEP"


class NonFiniteError(DistftError):
    """Too many consecutive non-finite steps."""


def _fault_plan() -> tuple[set[int], int | None]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return set(), None
    steps, _, rank = spec.partition("@")
    return {int(s) for s in steps.split(",") if s.strip()}, int(rank) if rank else None


def inject_nan(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault-injection hook (see module doc): NaN loss at the listed 1-based steps."""
    steps, only = _fault_plan()
    if step + 1 in steps and only in (None, rank):
        return loss * float("nan")
    return loss


def inject_sleep(step: int, rank: int) -> None:
    """Fault-injection hook (see module doc): stall before the listed 1-based step."""
    spec = os.environ.get(SLEEP_ENV, "").strip()
    if not spec:
        return
    at, _, rest = spec.partition(":")
    seconds, _, only = rest.partition("@")
    if step + 1 == int(at) and (not only or int(only) == rank):
        time.sleep(float(seconds))


class BadStepGuard:
    def __init__(self, max_bad: int, skipped: int = 0):
        self.max_bad = max_bad
        self.skipped = skipped  # over the whole run (restored on resume)
        self.in_a_row = 0

    def check(self, done: int, loss: float, grad_norm: float, sample_ids, last_good) -> bool:
        """True when step `done` was non-finite (skipped). Raises after max_bad in a row."""
        if math.isfinite(loss) and not math.isinf(grad_norm):
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.max_bad and self.in_a_row >= self.max_bad:
            raise NonFiniteError(
                f"stopping: {self.in_a_row} non-finite steps in a row (train.max_bad_steps={self.max_bad}); "
                f"step {done}: loss={loss}, grad_norm={grad_norm}; its global batch's sample ids "
                f"(train split indices): {sorted(sample_ids)}; last good checkpoint: "
                f"{last_good() or 'none'}. Lower train.lr, check those samples, or raise train.max_bad_steps"
            )
        return True
