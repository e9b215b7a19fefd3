"""Prefix tuning through PEFT: trainable key/value prefixes for every attention layer, the whole
model frozen. The prefixes reach the model as `past_key_values`, so there is nothing to merge."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.errors import ConfigError
from distft.ranges import num
from distft.strategies import check_tuning
from distft.tuning import peft_common


@dataclass
class PrefixConfig:
    name: str = "prefix"
    """Tuning mode."""
    num_virtual_tokens: int = num(16, ge=1)
    """Prefix length: trainable key/value positions prepended in every layer."""
    projection: bool = False
    """Reparametrize the prefixes through a 2-layer MLP (as in the prefix-tuning paper)."""
    encoder_hidden_size: int = num(0, ge=0)
    """Hidden size of that MLP (0: the model's hidden size)."""
    init_adapter: str | None = None
    """Continue from a saved prefix adapter (a PEFT adapter directory) instead of a fresh one."""
    merge_on_export: bool = False
    """Must stay false: prefixes are inputs, not weight deltas, and cannot be merged."""


config = PrefixConfig
adapter = True


def validate(cfg) -> None:
    t = cfg.tuning
    if t.num_virtual_tokens < 1 or t.encoder_hidden_size < 0:
        raise ConfigError(
            f"tuning.num_virtual_tokens={t.num_virtual_tokens}, tuning.encoder_hidden_size="
            f"{t.encoder_hidden_size}: need num_virtual_tokens >= 1 and encoder_hidden_size >= 0"
        )
    if t.merge_on_export:
        raise ConfigError(
            "tuning.merge_on_export=true with tuning=prefix: prefixes cannot be merged into weights; "
            "set it false (or use tuning=lora/dora/ia3 for a mergeable adapter)"
        )
    check_tuning(cfg)  # the strategy says whether it supports prefix tuning
    peft_common.check_init_adapter(t.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    from peft import PrefixTuningConfig

    t = cfg.tuning
    kwargs = {"encoder_hidden_size": t.encoder_hidden_size} if t.encoder_hidden_size else {}
    return PrefixTuningConfig(
        num_virtual_tokens=t.num_virtual_tokens,
        prefix_projection=t.projection,
        task_type=task_type,
        **kwargs,
    )


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    peft_common.report(model, cfg, f"{cfg.tuning.num_virtual_tokens} virtual tokens")
    return model
