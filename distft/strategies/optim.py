"""AdamW over the trainable parameters, without weight decay on biases and norms."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: torch.nn.Module, cfg, cpu_adam: bool = False) -> torch.optim.Optimizer:
    t = cfg.train
    groups = [g for g in param_groups(model, t.weight_decay) if g["params"]]
    betas = (t.adam_betas[0], t.adam_betas[1])
    if cpu_adam:  # ZeRO offload steps the optimizer on the host with DeepSpeed's vectorized Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, adamw_mode=True)
    # fused: one kernel per step and no full-size temporaries (foreach makes a copy of the second
    # moments), on CPU and GPU alike.
    return torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=True)
