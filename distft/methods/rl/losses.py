"""GRPO's loss family (`method.loss_type`): one small function per variant, in a plain registry.

Every variant returns, for one micro-batch, the *sum* of its loss terms and its share of the
normalizer (`num_targets`); the optimizer step divides the sum over all micro-batches of all
ranks by the summed normalizer (distft.strategies.step), so each variant's normalization is
exact under any grad-accum × world-size split of the same global batch:

  grpo    per-token clipped ratio loss, mean over each sequence's tokens, mean over sequences
  bnpo    the same per-token loss, mean over all tokens of the update (TRL's bnpo normalizes
          by its local batch only; here the count spans the update, as dapo's does)
  dapo    per-token loss with asymmetric clip (epsilon_high 0.28), mean over all tokens
  dr_grpo per-token loss summed, divided by sequences × max_new_tokens (a constant per sequence)
  gspo    one importance ratio per sequence, s = exp(mean_t log π/π_old), clipped per sequence,
          mean over sequences (KL: per-sequence token mean)
  cispo   REINFORCE term −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·log π, mean over all tokens

ρ = π/π_old per token. A KL-to-reference term β·k3 is added per token and normalized like the
policy term. Optional `is_weights` (truncated importance sampling of the rollout engine's
mismatch, `method.tis_cap`) multiply the per-token policy term, as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class PolicyTerms:
    """Inputs of one micro-batch: [B, T] token tensors, [B, 1] advantages."""

    logp: torch.Tensor
    """log π of each token (with grad)."""
    old_logp: torch.Tensor
    """log π_old (the policy that sampled; detached)."""
    adv: torch.Tensor
    mask: torch.Tensor
    """1.0 on completion tokens that take part."""
    eps_low: float
    eps_high: float
    max_len: int
    """Dr. GRPO's constant: method.max_new_tokens."""
    ref_logp: torch.Tensor | None = None
    beta: float = 0.0
    is_weights: torch.Tensor | None = None
    """[B, T] detached importance weights correcting the sampler/trainer mismatch (or None)."""


LossOut = tuple[torch.Tensor, dict]
"""(loss summed over the micro-batch, before normalization; {metric: (sum, count)})."""


def k3(t: PolicyTerms) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimator exp(ref − logp) − (ref − logp) − 1 (unbiased, >= 0)."""
    d = t.ref_logp - t.logp
    return torch.exp(d) - d - 1


def clipped_token_loss(t: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) per token, and whether the clip was active."""
    ratio = torch.exp(t.logp - t.old_logp)
    clipped = torch.clamp(ratio, 1 - t.eps_low, 1 + t.eps_high)
    loss = -torch.min(ratio * t.adv, clipped * t.adv)
    active = ((ratio < 1 - t.eps_low) & (t.adv < 0)) | ((ratio > 1 + t.eps_high) & (t.adv > 0))
    return loss, active


def _with_kl(t: PolicyTerms, per_token: torch.Tensor, parts: dict) -> torch.Tensor:
    if t.is_weights is not None:
        per_token = per_token * t.is_weights
    if t.ref_logp is None or t.beta == 0:
        return per_token
    kl = k3(t)
    parts["kl_k3"] = ((kl * t.mask).sum().detach(), t.mask.sum())
    return per_token + t.beta * kl


def _clip_stat(active: torch.Tensor, t: PolicyTerms) -> dict:
    return {"clipfrac": ((active.float() * t.mask).sum().detach(), t.mask.sum())}


def _seq_mean_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of each one's token mean."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()


def grpo(t: PolicyTerms) -> LossOut:
    loss, active = clipped_token_loss(t)
    parts = _clip_stat(active, t)
    return _seq_mean_sum(_with_kl(t, loss, parts), t.mask), parts


def token_sum(t: PolicyTerms) -> LossOut:
    """bnpo, dapo, dr_grpo: the clipped loss summed over tokens (their normalizers differ)."""
    loss, active = clipped_token_loss(t)
    parts = _clip_stat(active, t)
    return (_with_kl(t, loss, parts) * t.mask).sum(), parts


def gspo(t: PolicyTerms) -> LossOut:
    n = t.mask.sum(1, keepdim=True).clamp(min=1)
    log_s = ((t.logp - t.old_logp) * t.mask).sum(1, keepdim=True) / n  # length-normalized
    s = torch.exp(log_s)
    clipped = torch.clamp(s, 1 - t.eps_low, 1 + t.eps_high)
    seq_loss = -torch.min(s * t.adv, clipped * t.adv)  # [B, 1], broadcast over the tokens
    active = ((s < 1 - t.eps_low) & (t.adv < 0)) | ((s > 1 + t.eps_high) & (t.adv > 0))
    has = (t.mask.sum(1, keepdim=True) > 0).float()
    parts = {"clipfrac": ((active.float() * has).sum().detach(), has.sum())}
    return _seq_mean_sum(_with_kl(t, seq_loss.expand_as(t.logp), parts), t.mask), parts


def cispo(t: PolicyTerms) -> LossOut:
    ratio = torch.exp(t.logp - t.old_logp)
    weight = torch.clamp(ratio, 1 - t.eps_low, 1 + t.eps_high).detach()
    active = (ratio > 1 + t.eps_high) | (ratio < 1 - t.eps_low)
    parts = _clip_stat(active, t)
    per_token = -weight * t.adv * t.logp
    return (_with_kl(t, per_token, parts) * t.mask).sum(), parts


Norm = Literal["sequences", "tokens", "constant"]


@dataclass(frozen=True)
class LossType:
    fn: Callable[[PolicyTerms], LossOut]
    norm: Norm
    """What the summed loss is divided by, over the update on all ranks: the sequences, the
    tokens, or sequences × max_new_tokens."""
    eps: tuple[float | None, float | None]
    """Default (epsilon_low, epsilon_high); None: method.clip_range."""


LOSSES: dict[str, LossType] = {
    "grpo": LossType(grpo, "sequences", (None, None)),
    "bnpo": LossType(token_sum, "tokens", (None, None)),
    "dapo": LossType(token_sum, "tokens", (None, 0.28)),  # DAPO's clip-higher
    "dr_grpo": LossType(token_sum, "constant", (None, None)),
    "gspo": LossType(gspo, "sequences", (3e-4, 4e-4)),  # the GSPO paper's: sequence ratios stay near 1
    "cispo": LossType(cispo, "tokens", (1.0, 4.0)),  # no lower bound; weights capped at 5 (ScaleRL's ε_max)
}


def normalizer(loss_type: str, mask: torch.Tensor, max_len: int) -> float:
    """A micro-batch's share of the update's normalizer (the step sums the shares of all ranks)."""
    norm = LOSSES[loss_type].norm
    if norm == "tokens":
        return float(mask.sum())
    rows = float((mask.sum(1) > 0).sum())
    return rows if norm == "sequences" else rows * max_len


def epsilons(m) -> tuple[float, float]:
    """(ε_low, ε_high) of method config `m`: its epsilon_low/high, else the loss type's default,
    else clip_range."""
    lo, hi = LOSSES[m.loss_type].eps
    lo = m.epsilon_low if m.epsilon_low is not None else (lo if lo is not None else m.clip_range)
    hi = m.epsilon_high if m.epsilon_high is not None else (hi if hi is not None else m.clip_range)
    return lo, hi


def policy_loss(loss_type: str, t: PolicyTerms) -> LossOut:
    return LOSSES[loss_type].fn(t)
