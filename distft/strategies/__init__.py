"""Strategies, picked by `strategy=`: each module is a `distft.contracts.StrategyOption` —
`config`, `validate(cfg, gpu)`, `make(cfg, info)` (the `Strategy` that wraps the model and does
backward, step, save, load and places frozen models), `loads_sharded`, `supports_tuning` and
`memory` (its per-rank memory model, which the planner asks)."""

from __future__ import annotations

from omegaconf import OmegaConf

from distft.contracts import StrategyOption
from distft.errors import ConfigError
from distft.paths import conf_dir
from distft.strategies import auto, ddp, deepspeed_zero, fsdp, hsdp

STRATEGIES: dict[str, StrategyOption] = {
    "ddp": ddp,
    "fsdp": fsdp,
    "hsdp": hsdp,
    "zero1": deepspeed_zero,
    "zero2": deepspeed_zero,
    "zero3": deepspeed_zero,
    "zero3_offload": deepspeed_zero,
    "auto": auto,  # resolved to one of the above by distft.plan while the config loads
}

PLANNED = "auto"
"""The option the planner replaces with a concrete strategy while the config loads."""
AUTO_ORDER = ["ddp", "zero1", "zero2", "fsdp", "hsdp", "zero3", "zero3_offload"]
"""Fastest first: what `strategy=auto` tries in turn (replicas avoid parameter gathers). hsdp
shards over fewer ranks than fsdp, so it only comes first where fsdp does not fit either."""


def shipped_config(name: str):
    """The shipped option's block (conf/strategy/<name>.yaml) as its typed dataclass."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml"), resolve=True)
    return STRATEGIES[name].config(**raw)


def check_tuning(cfg) -> None:
    """Refuse a tuning mode the chosen strategy does not support (the strategy says why), naming
    the strategies that do."""
    name, tuning = cfg.strategy.name, cfg.tuning.name
    why = STRATEGIES[name].supports_tuning(tuning, cfg.strategy)
    if why is None:
        return
    ok = [n for n in STRATEGIES if n in AUTO_ORDER and n != name and _supports(n, tuning)]
    raise ConfigError(
        f"tuning={tuning} does not work with strategy={name}: {why}; use strategy={', '.join(ok)}"
    )


def _supports(name: str, tuning: str) -> bool:
    return STRATEGIES[name].supports_tuning(tuning, shipped_config(name)) is None
