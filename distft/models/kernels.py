"""Fast GPU kernels where installed: Liger's fused RMSNorm, SwiGLU, RoPE and fused linear
cross-entropy (`model.kernels=liger`), and flash-attention (`model.attn_implementation`:
flash_attention_2 from the flash-attn package, or a hub kernel such as kernels-community/flash-attn
through the `kernels` package). All are CUDA (Triton or CUDA) kernels: on CPU they are refused in
one line before any rank starts, and a missing package is named with its install command."""

from __future__ import annotations

import importlib.util

import torch

from distft.errors import ConfigError

FLASH = ("flash_attention_2", "flash_attention_3")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def validate(model_cfg, gpu: bool) -> None:
    """model.kernels and model.attn_implementation against the job's devices and packages."""
    attn = model_cfg.attn_implementation
    hub_kernel = "/" in attn  # a kernels-hub repository, e.g. kernels-community/flash-attn
    if model_cfg.kernels == "liger":
        if not gpu:
            raise ConfigError(
                "model.kernels=liger needs CUDA GPUs (Liger's kernels are Triton): set "
                "cluster.gpus_per_node, or model.kernels=none on CPU"
            )
        if not _installed("liger_kernel"):
            raise ConfigError(
                "model.kernels=liger needs Liger: pip install liger-kernel (or model.kernels=none)"
            )
    if attn in FLASH or hub_kernel:
        if not gpu:
            raise ConfigError(
                f"model.attn_implementation={attn} is a CUDA kernel: set cluster.gpus_per_node, or "
                "model.attn_implementation=sdpa on CPU"
            )
        package, pip = ("kernels", "kernels") if hub_kernel else ("flash_attn", "flash-attn")
        if not _installed(package):
            raise ConfigError(
                f"model.attn_implementation={attn} needs pip install {pip} "
                "(or model.attn_implementation=sdpa)"
            )


def apply(model: torch.nn.Module, model_cfg) -> list[str]:
    """Liger's kernels patched into this model instance by transformers' own integration (Liger's
    apply function for the model's family picks the RMSNorm, SwiGLU, RoPE and fused linear
    cross-entropy it supports); returns what was applied, [] when model.kernels=none. Called before
    the tuning and the strategy wrap the model, so PEFT and FSDP2 see the patched modules."""
    if model_cfg.kernels != "liger":
        return []
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, None)
    return [f"liger ({model.config.model_type})"]
