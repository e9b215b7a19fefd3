"""Advantage estimators: GAE with a learned critic (PPO), group-relative baselines (GRPO, RLOO),
and whitening whose statistics span all ranks (so they do not depend on the world size).

Token tensors are [batch, positions]; `mask` is 1 on action (completion) tokens, which are
contiguous in each row (prompt, then completion, then padding).
"""

from __future__ import annotations

import math

import torch

from distft.runtime import dist


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's action tokens; returns (advantages,
    returns). The value after the last action token is 0 (the episode ends there)."""
    mask = mask.to(values.dtype)
    values = values * mask
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Outside the action span (prompt, padding) nothing carries over.
        running = running * m
        adv[:, t] = running
        next_value = torch.where(m.bool(), values[:, t], next_value * 0)
    return adv, (adv + values) * mask


def masked_global_mean_var(
    x: torch.Tensor, mask: torch.Tensor, device, copies: int = 1
) -> tuple[float, float]:
    """Mean and (unbiased) variance of x over mask, across all ranks (`copies`: ranks holding the
    same rollouts, a context-parallel group's)."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    n, s, ss = dist.all_reduce_sum(
        [float(m.sum()), float((xd * m).sum()), float((xd * xd * m).sum())], device
    )
    if n < 1:
        return 0.0, 1.0
    mean = s / n
    var = max(ss / n - mean * mean, 0.0) * (n / max(n - copies, 1))
    return mean, var


def whiten(
    x: torch.Tensor, mask: torch.Tensor, device, shift_mean: bool = True, copies: int = 1
) -> torch.Tensor:
    mean, var = masked_global_mean_var(x, mask, device, copies)
    out = (x - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def group_advantages(
    scores: torch.Tensor, valid: torch.Tensor, group: int, kind: str = "grpo", scale: bool = True
) -> torch.Tensor:
    """One advantage per completion from its group of `group` completions of the same prompt.

    grpo: (r - group mean) / group std (std scaling optional). rloo: r - mean of the others.
    Invalid rewards (a failed reward function) take no part and get advantage 0.
    """
    r = scores.view(-1, group).to(torch.float64)
    v = valid.view(-1, group).to(torch.float64)
    n = v.sum(1, keepdim=True)
    total = (r * v).sum(1, keepdim=True)
    if kind == "rloo":
        baseline = (total - r) / (n - 1).clamp(min=1)
        adv = torch.where(n > 1, r - baseline, torch.zeros_like(r))
    else:
        mean = total / n.clamp(min=1)
        adv = r - mean
        if scale:
            var = (((r - mean) ** 2) * v).sum(1, keepdim=True) / (n - 1).clamp(min=1)
            adv = adv / (var.sqrt() + 1e-4)
    return (adv * v).view(-1).to(scores.dtype)
