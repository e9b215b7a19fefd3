"""DoRA through PEFT (LoRA with `use_dora`): each adapted weight is split into a magnitude vector
and a direction that LoRA updates; mergeable like LoRA, a little slower per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.errors import ConfigError
from distft.tuning import lora, peft_common

# Checked with 2 ranks: DDP, FSDP2 and ZeRO-2 give identical losses; ZeRO-3 fails in backward.
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2")


@dataclass
class DoraConfig(lora.LoraConfig):
    name: str = "dora"
    """Tuning mode."""


config = DoraConfig
adapter = True


def validate(cfg) -> None:
    lora.validate(cfg)
    if getattr(cfg.strategy, "stage", 0) == 3:
        raise ConfigError(
            f"tuning=dora does not work with strategy={cfg.strategy.name}: DoRA reads the base weight "
            "outside the layer's forward, which ZeRO-3 has already released (empty tensors in backward); "
            f"use strategy={', '.join(STRATEGIES)}"
        )
    peft_common.check_init_adapter(cfg.tuning.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    pc = lora.peft_config(cfg, task_type)
    pc.use_dora = True
    return pc


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    peft_common.report(model, cfg, f"r={cfg.tuning.r}, DoRA magnitudes")
    return model
