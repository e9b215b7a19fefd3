"""DoRA through PEFT (LoRA with `use_dora`): each adapted weight is split into a magnitude vector
and a direction that LoRA updates; mergeable like LoRA, a little slower per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.strategies import check_tuning
from distft.tuning import lora, peft_common


@dataclass
class DoraConfig(lora.LoraConfig):
    name: str = "dora"
    """Tuning mode."""


config = DoraConfig
adapter = True


def validate(cfg) -> None:
    lora.validate(cfg)
    check_tuning(cfg)  # the strategy says whether it supports DoRA
    peft_common.check_init_adapter(cfg.tuning.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    pc = lora.peft_config(cfg, task_type)
    pc.use_dora = True
    return pc


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    from distft.models import sharded_load

    fresh = not cfg.tuning.init_adapter and hasattr(model, sharded_load.CHECKPOINT_ATTR)
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    if fresh:  # a meta-device base: the magnitudes are computed from the shards once read
        setattr(model, sharded_load.DORA_ATTR, True)
    peft_common.report(model, cfg, f"r={cfg.tuning.r}, DoRA magnitudes")
    return model
