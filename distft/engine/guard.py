"""Non-finite guard: a step whose loss (all-reduced, so every rank sees the same value) or global
gradient norm is NaN/Inf is skipped (the strategies do not apply a non-finite update) and counted;
after train.max_bad_steps such steps in a row, training stops with what is needed to debug it.

fp16 runs have a dynamic loss scaler (DDP: torch.amp.GradScaler; DeepSpeed: its own) that starts
high (2^16) and halves on every overflow: the first steps of a run overflow by design while the
scale settles. A step whose gradients overflowed but which the scaler skipped and backed off from is
counted in skipped_steps but is not a bad step (it neither starts nor extends a run of bad steps),
as long as the scale is still above MIN_LOSS_SCALE (DeepSpeed's default floor): a scale driven
below it means the gradients are non-finite at any scale, and those steps count again. A
non-finite loss is always bad (no loss scale fixes the forward).

Fault injection (tests, and users checking their own setup): the environment variable
DISTFT_FAULT_NAN_STEPS="3,5,6" (optionally "@<rank>", e.g. "3,5@1") turns the loss of those
steps into NaN on that rank (all ranks without "@") before backward, so the NaN travels through
the real backward and gradient reduction. It is read only here and does nothing when unset.

DISTFT_FAULT_INF_GRAD_STEPS (same syntax) keeps the loss finite and makes its gradients infinite
at those steps: what an fp16 overflow looks like to the loss scaler and to the guard.

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
INF_GRAD_ENV = "DISTFT_FAULT_INF_GRAD_STEPS"
MIN_LOSS_SCALE = 1.0  # DeepSpeed's default min_loss_scale
SLEEP_ENV = "DISTFT_FAULT_SLEEP"


class NonFiniteError(DistftError):
    """Too many consecutive non-finite steps."""


def _fault_plan(env: str = FAULT_ENV) -> tuple[set[int], int | None]:
    spec = os.environ.get(env, "").strip()
    if not spec:
        return set(), None
    steps, _, rank = spec.partition("@")
    return {int(s) for s in steps.split(",") if s.strip()}, int(rank) if rank else None


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward turns the incoming gradient infinite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject_nan(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault-injection hook (see module doc): NaN loss, or a finite loss with infinite gradients,
    at the listed 1-based steps."""
    steps, only = _fault_plan()
    if step + 1 in steps and only in (None, rank):
        return loss * float("nan")
    steps, only = _fault_plan(INF_GRAD_ENV)
    if step + 1 in steps and only in (None, rank):
        return _InfGrad.apply(loss)
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


class LossScaleWatch:
    """Whether a strategy's dynamic loss scaler handled the last step's overflow (skipped the update
    and lowered, or with DeepSpeed's hysteresis is about to lower, its scale). Reads what each
    strategy already holds: DDP's `strategy.scaler` (torch.amp.GradScaler, which halves its scale
    on every overflow and never otherwise) or DeepSpeed's fp16 optimizer (`overflow`, `loss_scale`)."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.last_scale = self.scale()

    @classmethod
    def of(cls, strategy) -> LossScaleWatch | None:
        """A watch when the strategy trains with a dynamic loss scaler, else None."""
        if getattr(strategy, "scaler", None) is not None:
            return cls(strategy)
        engine = getattr(strategy, "engine", None)
        if engine is not None and engine.fp16_enabled():
            return cls(strategy)
        return None

    def scale(self) -> float:
        scaler = getattr(self.strategy, "scaler", None)
        if scaler is not None:
            return float(scaler.get_scale())
        return float(self.strategy.engine.optimizer.loss_scale)

    def overflow(self) -> str | None:
        """Call once per step, after it: None when the scaler saw no overflow, "handled" when it
        skipped the step and can still back off, "at_floor" when its scale is down to
        MIN_LOSS_SCALE (the gradients are non-finite at any scale)."""
        before, now = self.last_scale, self.scale()
        self.last_scale = now
        if getattr(self.strategy, "scaler", None) is not None:
            overflowed = now < before  # GradScaler halves on an overflow, never otherwise
        else:
            overflowed = bool(getattr(self.strategy.engine.optimizer, "overflow", False))
        if not overflowed:
            return None
        return "handled" if now > MIN_LOSS_SCALE else "at_floor"


class BadStepGuard:
    def __init__(self, max_bad: int, skipped: int = 0, scaler: LossScaleWatch | None = None):
        self.max_bad = max_bad
        self.skipped = skipped  # over the whole run (restored on resume)
        self.in_a_row = 0
        self.scaler = scaler  # fp16: overflows it handled are skipped but not bad

    def check(self, done: int, loss: float, grad_norm: float, sample_ids, last_good) -> bool:
        """True when step `done` was non-finite (skipped). Raises after max_bad in a row that no
        loss scaler handled."""
        # A NaN grad_norm alone means "no norm" (a method that made no update; DeepSpeed without
        # one), so only an infinite norm, a non-finite loss or a scaler's overflow marks a step.
        overflow = self.scaler.overflow() if self.scaler is not None else None
        if math.isfinite(loss) and not math.isinf(grad_norm) and overflow is None:
            self.in_a_row = 0
            return False
        self.skipped += 1
        if overflow == "handled" and math.isfinite(loss):
            return True  # the loss scale is settling: the scaler already skipped this step
        self.in_a_row += 1
        if self.max_bad and self.in_a_row >= self.max_bad:
            raise NonFiniteError(
                f"stopping: {self.in_a_row} non-finite steps in a row (train.max_bad_steps={self.max_bad}); "
                f"step {done}: loss={loss}, grad_norm={grad_norm}; its global batch's sample ids "
                f"(train split indices): {sorted(sample_ids)}; last good checkpoint: "
                f"{last_good() or 'none'}. Lower train.lr, check those samples, or raise train.max_bad_steps"
            )
        return True
