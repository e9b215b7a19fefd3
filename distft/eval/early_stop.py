"""Early stopping on a validation metric with best-step tracking (state saved in checkpoints)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from distft.errors import ConfigError

LOWER_IS_BETTER = ("loss", "ppl")


def resolve_mode(monitor: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if monitor.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"


@dataclass
class BestTracker:
    monitor: str = "eval/loss"
    mode: str = "min"
    patience: int = 0
    """Evaluations without improvement before stopping (0: never stop early)."""
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_step: int | None = None

    @classmethod
    def from_config(cls, cfg) -> BestTracker:
        e = cfg.eval
        return cls(e.monitor, resolve_mode(e.monitor, e.mode), e.patience, e.min_delta)

    def update(self, step: int, metrics: dict) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.monitor not in metrics:
            raise ConfigError(
                f"eval.monitor={self.monitor!r} is not among this run's eval metrics "
                f"({', '.join(sorted(k for k in metrics if k.startswith('eval/')))}); pick one of them"
            )
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    def should_stop(self, step: int) -> bool:
        if self.patience > 0 and self.bad_evals >= self.patience:
            self.stopped_step = step
            return True
        return False

    def state(self) -> dict:
        return asdict(self)

    def load(self, state: dict | None) -> None:
        """Progress from a checkpoint; the rule itself (patience, min_delta) comes from the config,
        and a checkpoint that watched another metric or direction starts the tracking afresh."""
        state = state or {}
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            return
        for k in ("best", "best_step", "bad_evals", "stopped_step"):
            setattr(self, k, state.get(k))
        self.bad_evals = self.bad_evals or 0
