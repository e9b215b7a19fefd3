"""GRPO (and RLOO): several sampled completions per prompt, advantages relative to the group,
no critic. One engine step = one batch of groups, then `method.epochs` clipped updates:

  loss_t = −min(ρ_t·A, clip(ρ_t, 1±ε)·A) + β·KL_t(π‖π_ref),   ρ_t = π/π_old
  GRPO:  A = (r − mean_group) / std_group      RLOO:  A = r − mean of the other completions

KL_t is the k3 estimator exp(ref − logp) − (ref − logp) − 1; token sums are normalized by the
global completion-token count, so world size and grad-accum do not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distft.errors import ConfigError
from distft.methods.rl import loop
from distft.methods.rl.advantages import group_advantages
from distft.methods.rl.config import RLConfig, validate_rl
from distft.methods.rl.method import PromptMethod
from distft.methods.rl.rollout import token_logprobs
from distft.ranges import num
from distft.runtime import dist
from distft.strategies.step import StepResult

Advantage = Literal["grpo", "rloo"]


@dataclass
class GRPOConfig(RLConfig):
    name: str = "grpo"
    """Method."""
    num_generations: int = num(4, ge=2)
    """Completions sampled per prompt (the group)."""
    advantage: Advantage = "grpo"
    """grpo (group-normalized) or rloo (leave-one-out baseline)."""
    scale_rewards: bool = True
    """grpo: divide by the group's reward std (false: only subtract the group mean)."""
    beta: float = num(0.01, ge=0)
    """KL-to-reference coefficient in the loss (0: no reference model is loaded)."""


class GRPO(PromptMethod):
    config = GRPOConfig

    @staticmethod
    def validate(cfg) -> None:
        validate_rl(cfg)
        m = cfg.method
        if m.num_generations < 2:
            raise ConfigError(
                f"method.num_generations must be >= 2 for group baselines (got {m.num_generations})"
            )
        if m.beta < 0:
            raise ConfigError(f"method.beta must be >= 0 (got {m.beta})")

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx) -> None:
        self.setup_policy(ctx, with_reference=self.cfg.method.beta > 0)

    # ------------------------------------------------------------------ step
    def train_step(self, ctx, step: int) -> StepResult:
        m, dev, st = self.cfg.method, ctx.info.device, ctx.strategy
        batch = loop.step_batch(self, ctx, step, copies=m.num_generations)  # rlenv: sync or async
        roll, scores = batch.rollouts, batch.scores
        skipped = self.failures.add(self.scorer, scores.failures, dev)
        mask = roll.mask * scores.valid.float()[:, None]  # a failed reward: no update from it
        adv = group_advantages(scores.total, scores.valid, m.num_generations, m.advantage, m.scale_rewards)

        # With one update per batch, π_old is the policy of that update: its log-probs are the
        # detached ones of the update's own forward (no extra pass).
        single = m.epochs == 1 and m.mini_batches == 1
        old_lp = batch.behaviour_logprobs  # rlenv: async rollouts, the ratio is against their sampler
        if old_lp is None and not single:
            old_lp = loop.forward_logprobs(st.model, st, roll, batch.micro, m.temperature, dev)
        ref_lp = self.reference_logprobs(st, roll, batch.micro) if m.beta > 0 else None
        # Σ_t log π_old/π_ref per rollout: the policy that sampled it against the reference.
        kl_seq = torch.zeros(len(roll), dtype=torch.float64)
        if old_lp is not None and ref_lp is not None:
            kl_seq = ((old_lp - ref_lp) * mask).sum(1).double()

        def loss_fn(model, b: dict) -> tuple[torch.Tensor, dict]:
            sl = b["sl"]
            mk, a = mask[sl].to(dev), adv[sl].to(dev).float()[:, None]
            lp = token_logprobs(model, roll.input_ids[sl].to(dev), m.temperature)
            old = lp.detach() if old_lp is None else old_lp[sl].to(dev)
            ratio = torch.exp(lp - old)
            clipped = torch.clamp(ratio, 1 - m.clip_range, 1 + m.clip_range)
            per_token = torch.maximum(-a * ratio, -a * clipped)
            parts = {"clipfrac": ((((ratio - 1).abs() > m.clip_range).float() * mk).sum().detach(), mk.sum())}
            if ref_lp is not None:
                d = ref_lp[sl].to(dev) - lp
                k3 = torch.exp(d) - d - 1  # unbiased, always >= 0
                per_token = per_token + m.beta * k3
                parts["kl_k3"] = ((k3 * mk).sum().detach(), mk.sum())
                if old_lp is None:  # the single update's policy is the sampler
                    kl_seq[sl] = (-d * mk).sum(1).detach().double().cpu()
            return (per_token * mk).sum(), parts

        updates = loop.minibatches(len(roll), m.mini_batches, ctx.geometry.accum)
        sums = loop.Sums()
        loss_total, grad_norm = 0.0, float("nan")
        for _ in range(m.epochs):
            for mb in updates:
                lr = ctx.lr_at(step) * m.lr_scale
                r = ctx.run_step(loop.update_batches(mb, mask), loss_fn, lr, reduce_metrics=False)
                loss_total, grad_norm = loss_total + r.loss, r.grad_norm
                sums.merge(r.parts)
        loop.rollout_metrics(sums, batch, kl_seq)
        sums.add("advantage_abs", (adv.abs() * scores.valid).sum(), scores.valid.sum())
        metrics = sums.reduce(dev)
        metrics["reward_failures"] = skipped
        (seq_tokens,) = dist.all_reduce_sum(
            [float((roll.input_ids != self.tokenizer.pad_token_id).sum())], dev
        )
        return StepResult(
            loss_total / (m.epochs * len(updates)), int(seq_tokens) * m.epochs, grad_norm, metrics
        )
