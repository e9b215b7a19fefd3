"""DoRA through PEFT (LoRA with `use_dora`): each adapted weight is split into a magnitude vector
and a direction that LoRA updates; mergeable like LoRA, a little slower per step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distft.tuning import lora, peft_common


@dataclass
class DoraConfig:
    name: str = "dora"
    """Tuning mode."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or ['all-linear'] for every linear layer but the output head."""
    init_adapter: str | None = None
    """Continue from a saved DoRA adapter (a PEFT adapter directory) instead of a fresh one."""
    merge_on_export: bool = False
    """Also write merged full weights to export/merged."""


config = DoraConfig
adapter = True


def validate(cfg) -> None:
    lora.validate(cfg)
    peft_common.check_init_adapter(cfg.tuning.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    pc = lora.peft_config(cfg, task_type)
    pc.use_dora = True
    return pc


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    # DoRA reads the base layer's weight (for its norm) outside the base layer's forward.
    from peft.tuners.lora.layer import LoraLayer

    peft_common.zero3_leaves(model, cfg, LoraLayer)
    peft_common.report(model, cfg, f"r={cfg.tuning.r}, DoRA magnitudes")
    return model
