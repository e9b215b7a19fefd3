"""PPO (RLHF's classic pipeline): actor, critic, frozen reference, rule-based rewards and/or a
frozen reward model. One engine step = one batch of rollouts, then `method.epochs` clipped
updates of policy and critic:

  rollouts (sampling) → rewards → per-token reward −kl_coef·(log π_old − log π_ref), plus the
  score on the last token → GAE(γ, λ) with the critic's values → whitened advantages (over all
  ranks) → clipped policy loss and clipped value loss, token sums normalized by the global
  token count (so world size and grad-accum do not change the update).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distft.errors import ConfigError
from distft.methods.rl import engines, loop, models
from distft.methods.rl.advantages import gae, whiten
from distft.methods.rl.config import RLConfig, validate_rl
from distft.methods.rl.method import PromptMethod
from distft.methods.rl.rollout import token_logprobs, token_values
from distft.ranges import num
from distft.runtime import dist
from distft.strategies.step import StepResult, optimizer_step


@dataclass
class PPOConfig(RLConfig):
    name: str = "ppo"
    """Method."""
    epochs: int = num(4, ge=1)
    """Passes over each batch of rollouts (PPO epochs)."""
    kl_coef: float = num(0.02, ge=0)
    """Per-token KL penalty in the reward: r_t −= kl_coef · (log π_old − log π_ref)."""
    gamma: float = num(1.0, ge=0, le=1)
    """Discount."""
    lam: float = num(0.95, ge=0, le=1)
    """GAE λ."""
    whiten_advantages: bool = True
    """Normalize advantages to mean 0, std 1 over all action tokens of all ranks."""
    clip_range_value: float = num(0.2, ge=0)
    """Value clipping around the rollout-time values (0 disables)."""
    critic_lr: float = num(3e-3, gt=0)
    """Critic peak learning rate (it follows the policy's schedule shape)."""


class PPO(PromptMethod):
    config = PPOConfig

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.critic = None

    @staticmethod
    def validate(cfg) -> None:
        validate_rl(cfg)
        engines.validate(cfg)
        m = cfg.method
        if not 0 <= m.lam <= 1 or not 0 <= m.gamma <= 1:
            raise ConfigError(f"method.gamma and method.lam must be in [0, 1] (got {m.gamma}, {m.lam})")
        if m.kl_coef < 0 or m.clip_range_value < 0 or m.critic_lr <= 0:
            raise ConfigError("method.kl_coef and method.clip_range_value must be >= 0, method.critic_lr > 0")

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx) -> None:
        self.setup_policy(ctx, with_reference=self.cfg.method.kl_coef > 0)
        self.critic = models.build_critic(ctx, self.start_policy)

    def save_state(self, path: Path) -> None:
        self.critic.save(path / "critic")
        super().save_state(path)

    def load_state(self, path: Path) -> None:
        self.critic.load(path / "critic")
        super().load_state(path)

    def export_extra(self, ctx, out: Path) -> None:
        """The critic in Hugging Face format (AutoModelForTokenClassification, one output)."""
        models.save_hf(
            self.critic, self.start_policy, out / "critic", self.tokenizer, self.cfg, ctx.info, causal=False
        )

    # ------------------------------------------------------------------ step
    def train_step(self, ctx, step: int) -> StepResult:
        m, dev, st = self.cfg.method, ctx.info.device, ctx.strategy
        examples, micro = loop.step_examples(ctx, step)
        batch = loop.rollout_batch(ctx, self.scorer, examples, copies=1, micro=micro)
        roll, scores = batch.rollouts, batch.scores
        skipped = self.failures.add(self.scorer, scores.failures, dev)
        mask = roll.mask * scores.valid.float()[:, None]  # a failed reward: no update from it

        old_lp = loop.forward_logprobs(st.model, st, roll, micro, m.temperature, dev)
        ref_lp = self.reference_logprobs(st, roll, micro) if m.kl_coef > 0 else old_lp
        old_values = self._values(roll, loop.micro_slices(len(roll), micro))
        kl = (old_lp - ref_lp) * mask
        last = (roll.mask.cumsum(1) == roll.mask.sum(1, keepdim=True)) & (roll.mask > 0)
        rewards = -m.kl_coef * kl + last.float() * scores.total.float()[:, None]
        adv, returns = gae(rewards, old_values, mask, m.gamma, m.lam)
        if m.whiten_advantages:
            adv = whiten(adv, mask, dev, copies=ctx.info.world_size // ctx.geometry.dp)  # cp: same rollouts
        sums = loop.Sums()
        is_w = None  # the rollout engine's mismatch: truncated importance weights (method.tis_cap)
        if roll.sample_logprobs is not None:
            is_w, diff, count = engines.tis_weights(old_lp, roll.sample_logprobs, mask, m.tis_cap)
            sums.add("rollout/logprob_diff", diff, count)

        def policy_loss(model, b: dict) -> tuple[torch.Tensor, dict]:
            sl = b["sl"]
            a, mk, old = adv[sl].to(dev), mask[sl].to(dev), old_lp[sl].to(dev)
            lp = token_logprobs(model, roll.input_ids[sl].to(dev), m.temperature)
            ratio = torch.exp(lp - old)
            clipped = torch.clamp(ratio, 1 - m.clip_range, 1 + m.clip_range)
            with torch.no_grad():
                parts = {
                    "clipfrac": ((((ratio - 1).abs() > m.clip_range).float() * mk).sum(), mk.sum()),
                    "approx_kl": ((0.5 * (lp - old) ** 2 * mk).sum(), mk.sum()),
                }
            per_token = torch.maximum(-a * ratio, -a * clipped)
            if is_w is not None:
                per_token = per_token * is_w[sl].to(dev)
            return (per_token * mk).sum(), parts

        updates = loop.minibatches(len(roll), m.mini_batches, ctx.geometry.accum)
        loop.rollout_metrics(sums, batch, kl.sum(1))
        grad_norm = critic_norm = float("nan")
        loss_total = 0.0
        for _ in range(m.epochs):
            for mb in updates:
                batches = loop.update_batches(mb, mask)
                r = ctx.run_step(batches, policy_loss, ctx.lr_at(step) * m.lr_scale, reduce_metrics=False)
                loss_total, grad_norm = loss_total + r.loss, r.grad_norm
                sums.merge(r.parts)
                critic_norm = self._critic_update(
                    ctx.lr_at(step), roll, batches, old_values, returns, mask, sums
                )
        metrics = sums.reduce(dev)
        metrics["reward_failures"] = skipped
        metrics["critic_grad_norm"] = critic_norm
        (seq_tokens,) = dist.all_reduce_sum(
            [float((roll.input_ids != self.tokenizer.pad_token_id).sum())], dev
        )
        seq_tokens *= ctx.geometry.dp / ctx.info.world_size  # a cp group's ranks hold the same rollouts
        n_updates = m.epochs * len(updates)
        return StepResult(loss_total / n_updates, int(seq_tokens) * m.epochs, grad_norm, metrics)

    @torch.no_grad()
    def _values(self, roll, slices) -> torch.Tensor:
        critic, dev = self.critic, self.critic.info.device
        was_training = critic.model.training
        critic.model.eval()
        out = []
        for sl in slices:
            with critic.accumulate(True):
                out.append(token_values(critic.model, roll.input_ids[sl].to(dev)).cpu())
        critic.model.train(was_training)
        return torch.cat(out)

    def _critic_update(self, lr: float, roll, batches, old_values, returns, mask, sums) -> float:
        """One clipped value-loss step of the critic (its own strategy) over an update's batches."""
        m, critic, dev = self.cfg.method, self.critic, self.critic.info.device

        def value_loss(model, b: dict) -> tuple[torch.Tensor, dict]:
            sl = b["sl"]
            v = token_values(model, roll.input_ids[sl].to(dev))
            ret, old, mk = returns[sl].to(dev), old_values[sl].to(dev), mask[sl].to(dev)
            loss_v = (v - ret) ** 2
            if m.clip_range_value > 0:
                v_clip = old + torch.clamp(v - old, -m.clip_range_value, m.clip_range_value)
                loss_v = torch.maximum(loss_v, (v_clip - ret) ** 2)
            loss = 0.5 * (loss_v * mk).sum()
            return loss, {"value_loss": (loss.detach(), mk.sum())}

        critic_lr = lr / max(self.cfg.train.lr, 1e-12) * m.critic_lr
        r = optimizer_step(critic, batches, value_loss, dev, critic_lr, reduce_metrics=False)
        sums.merge(r.parts)
        return r.grad_norm
