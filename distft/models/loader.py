"""Load a causal LM and its tokenizer from a hub id or local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from distft.dtypes import PRECISION_DTYPES
from distft.errors import ConfigError
from distft.models.tiny import build_tiny
from distft.runtime import dist


def resolve_model_path(cfg, output_dir: Path, info) -> str:
    """The model's name_or_path; the tiny default is built into the run dir by one rank per node."""
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    path = output_dir / "base_model"
    # Rank 0 first, then each other node's local rank 0 only where the run dir is not shared:
    # never two writers on one filesystem (a shared run dir raced under load in CI).
    if info.rank == 0:
        build_tiny(path, cfg.model)
    dist.barrier()
    if info.local_rank == 0 and info.rank != 0:
        build_tiny(path, cfg.model)
    dist.barrier()
    return str(path)


def load_tokenizer(name_or_path: str, cfg):
    from transformers import AutoTokenizer

    from distft.models import vlm

    if vlm.is_vlm(name_or_path, cfg.model.trust_remote_code):
        return vlm.processor_tokenizer(name_or_path, cfg)  # with its processor (images)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"cannot load a tokenizer from model.name_or_path={name_or_path!r}: {e}. "
            "Give a local Hugging Face directory or a reachable hub id."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_dtype(cfg, adapter: bool) -> torch.dtype:
    """The dtype a model's weights are loaded in. Full tuning keeps fp32 weights (the optimizer's
    master copy; autocast or the sharding policy makes the low-precision copies). Adapter tunings
    load the frozen base in the compute precision (bf16 halves its host and device memory); their
    trainable weights are fp32 (distft.tuning.peft_common.wrap)."""
    return PRECISION_DTYPES[cfg.train.precision] if adapter else torch.float32


def load_model(name_or_path: str, cfg, dtype: torch.dtype, extra: dict, auto_class=None):
    from transformers import AutoModelForCausalLM

    from distft.models import vlm

    if auto_class is None and vlm.is_vlm(name_or_path, cfg.model.trust_remote_code):
        auto_class = vlm.auto_class()
    auto_class = auto_class or AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            **extra,
        )
    except OSError as e:
        raise ConfigError(
            f"cannot load model.name_or_path={name_or_path!r}: {e}. "
            "Give a local Hugging Face directory or a reachable hub id."
        ) from None
    return model
