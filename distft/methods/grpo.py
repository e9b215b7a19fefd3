"""GRPO (and RLOO): several sampled completions per prompt, advantages relative to the group,
no critic. One engine step = one batch of groups, then `method.epochs` clipped updates:

  loss_t = −min(ρ_t·A, clip(ρ_t, 1−ε_low, 1+ε_high)·A) + β·KL_t(π‖π_ref),   ρ_t = π/π_old
  GRPO:  A = (r − mean_group) / std_group      RLOO:  A = r − mean of the other completions

KL_t is the k3 estimator exp(ref − logp) − (ref − logp) − 1. `method.loss_type` picks the
variant and its normalization (distft.methods.rl.losses: grpo, bnpo, dapo, dr_grpo, gspo,
cispo); each normalizer spans the update's rollouts on all ranks, so world size and grad-accum
do not change the update. DAPO's dynamic sampling and overlong shaping: distft.methods.rl.sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distft.errors import ConfigError
from distft.methods.rl import engines, loop, sampling
from distft.methods.rl.advantages import group_advantages
from distft.methods.rl.async_rollouts import AsyncRollouts
from distft.methods.rl.config import RLConfig, validate_rl
from distft.methods.rl.losses import PolicyTerms, epsilons, normalizer, policy_loss
from distft.methods.rl.method import PromptMethod
from distft.methods.rl.rollout import token_logprobs
from distft.ranges import num
from distft.runtime import dist
from distft.strategies.step import StepResult

Advantage = Literal["grpo", "rloo"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "gspo", "cispo"]


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
    # --- loss family (rlloss)
    loss_type: LossType = "bnpo"
    """Policy loss and its normalization: grpo (token mean per sequence, mean over sequences),
    bnpo (mean over the update's tokens), dapo (bnpo + clip-higher), dr_grpo (sum / sequences ×
    max_new_tokens), gspo (sequence-level ratio and clip), cispo (clipped stop-gradient IS weight
    on a REINFORCE term). See distft/methods/rl/losses.py."""
    epsilon_low: float | None = None
    """Lower clip: ratio >= 1 − epsilon_low (null: the loss type's default, else clip_range)."""
    epsilon_high: float | None = None
    """Upper clip: ratio <= 1 + epsilon_high (null: dapo 0.28, gspo 4e-4, cispo 4.0, else clip_range)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill them with new prompts' groups."""
    max_refills: int = num(2, ge=0)
    """Dynamic sampling: extra generation rounds per step at most."""
    overlong_buffer: int = num(0, ge=0)
    """DAPO overlong shaping: completions longer than max_new_tokens − overlong_buffer are
    penalized linearly, down to −overlong_penalty at max_new_tokens (0: off)."""
    overlong_penalty: float = num(1.0, ge=0)
    """Overlong shaping: the penalty at max_new_tokens."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: completions cut at max_new_tokens (no EOS) take no part in the loss."""


class GRPO(PromptMethod):
    config = GRPOConfig

    @staticmethod
    def validate(cfg) -> None:
        validate_rl(cfg)
        engines.validate(cfg)
        m = cfg.method
        if m.num_generations < 2:
            raise ConfigError(
                f"method.num_generations must be >= 2 for group baselines (got {m.num_generations})"
            )
        if m.beta < 0:
            raise ConfigError(f"method.beta must be >= 0 (got {m.beta})")
        if m.async_steps and m.dynamic_sampling:
            raise ConfigError(
                "method.dynamic_sampling refills groups by generating again within the step; it does not "
                "combine with method.async_steps > 0: set one of them off"
            )
        lo, hi = epsilons(m)
        if not (0 < lo <= 1 and hi > 0):
            raise ConfigError(
                f"method.epsilon_low={lo} must be in (0, 1] and method.epsilon_high={hi} > 0 "
                f"(loss_type={m.loss_type}; null takes its default)"
            )
        if m.overlong_buffer > m.max_new_tokens:
            raise ConfigError(
                f"method.overlong_buffer={m.overlong_buffer} exceeds method.max_new_tokens="
                f"{m.max_new_tokens}; pick a buffer of at most max_new_tokens (e.g. max_new_tokens // 4)"
            )

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx) -> None:
        self.setup_policy(ctx, with_reference=self.cfg.method.beta > 0)
        self.async_rollouts: AsyncRollouts | None = None  # method.async_steps > 0: built at the first step

    # ------------------------------------------------------------------ step
    def train_step(self, ctx, step: int) -> StepResult:
        m = self.cfg.method
        if m.async_steps:  # rlenv: rollouts from the background generator, at most async_steps old
            if self.async_rollouts is None:
                self.async_rollouts = AsyncRollouts(ctx, self.scorer, m.num_generations)
            batch = self.async_rollouts.take(step)
            extra = {
                "reward_failures": self.failures.add(self.scorer, batch.scores.failures, ctx.info.device)
            }
            sampling.shape_overlong(batch.scores, batch.rollouts.completion_ids, m)
        else:
            examples, micro = loop.step_examples(ctx, step)
            batch, extra = sampling.collect(ctx, self.scorer, self.failures, examples, micro, step)
        return self.update(ctx, step, batch, extra)

    def update(self, ctx, step: int, batch: loop.Batch, extra: dict | None = None) -> StepResult:
        """`method.epochs` × `method.mini_batches` optimizer steps on a batch of scored groups."""
        m, dev, st = self.cfg.method, ctx.info.device, ctx.strategy
        roll, scores = batch.rollouts, batch.scores
        mask = roll.mask * scores.valid.float()[:, None]  # a failed reward: no update from it
        if m.mask_truncated:
            mask = mask * torch.tensor(roll.stopped, dtype=mask.dtype)[:, None]
        adv = group_advantages(scores.total, scores.valid, m.num_generations, m.advantage, m.scale_rewards)
        eps_low, eps_high = epsilons(m)

        # With one update per batch, π_old is the policy of that update: its log-probs are the
        # detached ones of the update's own forward (no extra pass).
        sample_lp = roll.sample_logprobs
        single = m.epochs == 1 and m.mini_batches == 1 and (m.tis_cap is None or sample_lp is None)
        old_lp = batch.behaviour_logprobs  # async rollouts: the ratio is against their generating policy
        if old_lp is None and not single:
            old_lp = loop.forward_logprobs(st.model, st, roll, batch.micro, m.temperature, dev)
        ref_lp = self.reference_logprobs(st, roll, batch.micro) if m.beta > 0 else None
        # Σ_t log π_old/π_ref per rollout: the policy that sampled it against the reference.
        kl_seq = torch.zeros(len(roll), dtype=torch.float64)
        if old_lp is not None and ref_lp is not None:
            kl_seq = ((old_lp - ref_lp) * mask).sum(1).double()
        sums = loop.Sums()
        is_w = None  # the rollout engine's mismatch: truncated importance weights (method.tis_cap)
        if old_lp is not None and sample_lp is not None:
            is_w, diff, count = engines.tis_weights(old_lp, sample_lp, mask, m.tis_cap)
            sums.add("rollout/logprob_diff", diff, count)

        def terms(lp: torch.Tensor, sl: slice) -> PolicyTerms:
            return PolicyTerms(
                logp=lp,
                old_logp=lp.detach() if old_lp is None else old_lp[sl].to(dev),
                adv=adv[sl].to(dev).float()[:, None],
                mask=mask[sl].to(dev),
                eps_low=eps_low,
                eps_high=eps_high,
                max_len=m.max_new_tokens,
                ref_logp=None if ref_lp is None else ref_lp[sl].to(dev),
                beta=m.beta,
                is_weights=None if is_w is None else is_w[sl].to(dev),
            )

        def loss_fn(model, b: dict) -> tuple[torch.Tensor, dict]:
            sl = b["sl"]
            lp = token_logprobs(model, roll.input_ids[sl].to(dev), m.temperature)
            t = terms(lp, sl)
            loss, parts = policy_loss(m.loss_type, t)
            if ref_lp is not None and old_lp is None:  # the single update's policy is the sampler
                kl_seq[sl] = ((lp - t.ref_logp).detach() * t.mask).sum(1).double().cpu()
            return loss, parts

        updates = loop.minibatches(len(roll), m.mini_batches, ctx.geometry.accum)
        loss_total, grad_norm = 0.0, float("nan")
        for _ in range(m.epochs):
            for mb in updates:
                lr = ctx.lr_at(step) * m.lr_scale
                norms = [normalizer(m.loss_type, mask[sl], m.max_new_tokens) for sl in mb]
                micro_batches = [{"sl": sl, "num_targets": n} for sl, n in zip(mb, norms)]
                r = ctx.run_step(micro_batches, loss_fn, lr, reduce_metrics=False)
                loss_total, grad_norm = loss_total + r.loss, r.grad_norm
                sums.merge(r.parts)
        loop.rollout_metrics(sums, batch, kl_seq)
        sums.add("advantage_abs", (adv.abs() * scores.valid).sum(), scores.valid.sum())
        metrics = sums.reduce(dev)
        metrics.update(extra or {})
        metrics.setdefault("reward_failures", 0)
        (seq_tokens,) = dist.all_reduce_sum(
            [float((roll.input_ids != self.tokenizer.pad_token_id).sum())], dev
        )
        seq_tokens *= ctx.geometry.dp / ctx.info.world_size  # a cp group's ranks hold the same rollouts
        return StepResult(
            loss_total / (m.epochs * len(updates)), int(seq_tokens) * m.epochs, grad_norm, metrics
        )
