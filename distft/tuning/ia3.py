"""IA3 through PEFT: learned vectors that rescale keys, values and the MLP's inner activations
(about 0.01-0.1% of the parameters); mergeable into the base weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distft.errors import ConfigError
from distft.strategies import check_tuning
from distft.tuning import peft_common


@dataclass
class IA3Config:
    name: str = "ia3"
    """Tuning mode."""
    target_modules: list[str] = field(default_factory=list)
    """Modules to rescale; empty: PEFT's default for the architecture (Llama: k_proj, v_proj,
    down_proj)."""
    feedforward_modules: list[str] = field(default_factory=list)
    """Which of target_modules are MLP layers (their input is rescaled); empty with empty
    target_modules: PEFT's default."""
    init_adapter: str | None = None
    """Continue from a saved IA3 adapter (a PEFT adapter directory) instead of a fresh one."""
    merge_on_export: bool = False
    """Also write merged full weights to export/merged."""


config = IA3Config
adapter = True


def validate(cfg) -> None:
    t = cfg.tuning
    unknown = set(t.feedforward_modules) - set(t.target_modules)
    if t.target_modules and unknown:
        raise ConfigError(
            f"tuning.feedforward_modules={sorted(unknown)} are not in tuning.target_modules="
            f"{t.target_modules}; feedforward modules must be a subset of the targets"
        )
    check_tuning(cfg)  # the strategy says whether it supports IA3
    peft_common.check_init_adapter(t.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    from peft import IA3Config as PeftIA3Config

    t = cfg.tuning
    kwargs = {}
    if t.target_modules:
        kwargs = {
            "target_modules": list(t.target_modules),
            "feedforward_modules": list(t.feedforward_modules),
        }
    return PeftIA3Config(task_type=task_type, **kwargs)


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    peft_common.report(model, cfg)
    return model
