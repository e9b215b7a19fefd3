"""fp32 matmul precision on CUDA: TF32 tensor cores (train.tf32, on by default).

An fp32 run on Ampere or newer otherwise runs its matmuls on the CUDA cores at ~1/7–1/15 of the
tensor-core rate (H100: 67 vs 495 TFLOP/s dense). TF32 keeps fp32 storage, range and accumulation
and rounds the matmul inputs to a 10-bit mantissa, the trade PyTorch's own docs and every large
trainer make for training; `train.tf32=false` keeps full IEEE fp32 (bit-for-bit comparisons).
Only CUDA backends are touched (torch's per-backend API): CPU (oneDNN) matmuls stay IEEE fp32.
bf16/fp16 runs are unaffected apart from the few fp32 matmuls they keep.
"""

from __future__ import annotations

import torch


def configure(tf32: bool, device: torch.device) -> bool:
    """Set CUDA's fp32 matmul/convolution precision for this process; returns whether TF32 is on.
    A no-op (False) on other devices."""
    if device.type != "cuda":
        return False
    value = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value
    return tf32


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls may run as TF32 now (however it was set)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"
