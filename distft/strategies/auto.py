"""strategy=auto: a placeholder the planner replaces while the config loads (distft.plan.auto),
so no rank ever builds it; its keys steer the choice."""

from __future__ import annotations

from dataclasses import dataclass

from distft.errors import ConfigError


@dataclass
class AutoConfig:
    name: str = "auto"
    """Strategy: the first of ddp, zero1, zero2, fsdp, zero3, zero3_offload whose per-rank
    estimate fits train.memory_gib (see `distft-plan`)."""


config = AutoConfig
loads_sharded = False


def validate(cfg, gpu: bool) -> None:
    pass


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    return None  # the planner only tries the strategies that support the tuning


def memory(shape, strategy_cfg, job):
    raise ConfigError("strategy=auto has no memory model of its own: the planner resolves it first")


def make(cfg, info):
    raise ConfigError("strategy=auto must be resolved by the planner before the strategy is built")
