"""LoRA through PEFT: low-rank adapters on the chosen linear layers, the base frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distft.errors import ConfigError
from distft.ranges import num
from distft.tuning import peft_common


@dataclass
class LoraConfig:
    name: str = "lora"
    """Tuning mode."""
    r: int = num(8, ge=1)
    """Adapter rank."""
    alpha: int = num(16, gt=0)
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = num(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or ['all-linear'] for every linear layer but the output head."""
    init_adapter: str | None = None
    """Continue from a saved adapter of this kind (a PEFT adapter directory) instead of a fresh one."""
    merge_on_export: bool = False
    """Also write merged full weights to export/merged."""
    train_router: bool = False
    """Mixture-of-experts models with all-linear: also train each MoE layer's router (in full, beside
    the adapters on attention, shared and routed experts); default frozen (distft/tuning/moe.py)."""


config = LoraConfig
adapter = True


def validate(cfg) -> None:
    t = cfg.tuning
    if t.r < 1 or t.alpha <= 0 or not 0 <= t.dropout < 1:
        raise ConfigError(
            f"tuning.r={t.r}, tuning.alpha={t.alpha}, tuning.dropout={t.dropout}: need r >= 1, "
            "alpha > 0 and 0 <= dropout < 1"
        )
    peft_common.check_init_adapter(t.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    t = cfg.tuning
    targets = t.target_modules
    return PeftLoraConfig(
        r=t.r,
        lora_alpha=t.alpha,
        lora_dropout=t.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type=task_type,
    )


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    peft_common.report(model, cfg, f"r={cfg.tuning.r}")
    return model
