"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FullConfig:
    name: str = "full"
    """Tuning mode."""
    merge_on_export: bool = False
    """Unused for full tuning (the export is already full weights)."""


config = FullConfig
adapter = False


def validate(cfg) -> None:
    pass


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    return model
