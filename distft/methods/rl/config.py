"""Configuration shared by the RL methods (`method=ppo`, `method=grpo`); each adds its own keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distft.errors import ConfigError
from distft.ranges import num

DEFAULT_REWARD = [{"_target_": "distft.methods.rl.rewards.char_match", "weight": 1.0}]


@dataclass
class RLConfig:
    name: str = "ppo"
    """Method."""
    num_prompts: int = 640
    """Embedded default task: prompts generated (split by data.splits like any data)."""
    sft_warmup_steps: int = 100
    """Steps of SFT on the default task run before RL, so a random-init policy earns reward
    (0: start from model.name_or_path as given). Skipped when resuming."""
    sft_warmup_lr: float = 3e-3
    """Learning rate of the SFT warm-up (constant)."""
    sft_warmup_batch: int = 32
    """Examples per SFT warm-up step over all ranks (rounded to a multiple of world size × grad_accum)."""
    max_new_tokens: int = 8
    """Completion length of rollouts and of the greedy reward eval."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs use the same temperature)."""
    epochs: int = 2
    """Passes over each batch of rollouts (PPO epochs; TRL's num_iterations)."""
    mini_batches: int = 4
    """Optimizer steps per epoch: each rank's rollouts are split into this many minibatches (each
    still train.grad_accum micro-batches)."""
    clip_range: float = 0.2
    """Policy ratio clipping: 1 ± clip_range."""
    lr_scale: float = 0.1
    """Policy learning rate = train.lr × lr_scale: RL wants a smaller step than SFT (the default
    train.lr of 3e-3 suits the tiny model's SFT, 3e-4 its RL)."""
    reward_funcs: list[dict[str, Any]] = field(default_factory=lambda: [dict(r) for r in DEFAULT_REWARD])
    """Rule-based rewards: {_target_: dotted.path.to.callable, weight: w, **kwargs}. Called as
    fn(prompts=, completions=, completion_ids=, stopped=, **row_columns) -> list[float | None]."""
    reward_model: str | None = None
    """Path of a `method=reward` export (AutoModelForSequenceClassification); its score is added."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score."""
    max_reward_failures: int = 16
    """Rollouts whose reward raised or was not finite that may be skipped (counted, logged) over
    the whole run before training stops with an error."""
    # --- rlenv: multi-turn environments, reward servers, asynchronous rollouts
    env: dict[str, Any] | None = None
    """Multi-turn environment: {_target_: dotted.path.to.Environment class, **kwargs}, one instance
    per episode (distft.methods.rl.env). Tool results and other observations are appended as tokens
    masked out of the loss; the environment's rewards are added to the score (GRPO/RLOO)."""
    max_turns: int = num(1, ge=1)
    """Policy turns per episode with method.env (each up to max_new_tokens tokens)."""
    async_steps: int = num(0, ge=0)
    """Generate the rollouts of the next N steps while the current step trains (GRPO/RLOO; a
    background thread with a snapshot of the policy; unsharded strategies). Rollouts are at most
    N updates old (logged as staleness) and the update's ratio is against the generating policy's
    log-probs. 0: the synchronous loop."""
    # --- rollout engine and train/rollout mismatch (rlloss; distft/methods/rl/engines.py)
    rollout: dict[str, Any] = field(default_factory=lambda: {"engine": "hf"})
    """Rollout engine: {engine: hf} (transformers generate, CPU and GPU) or {engine: vllm} (GPU only)."""
    tis_cap: float | None = None
    """Truncated importance sampling of the rollout engine's mismatch: each token's policy term
    × min(π_old/π_sampler, tis_cap) (null: no correction; rollout/logprob_diff is logged anyway)."""


def validate_rl(cfg) -> None:
    m = cfg.method
    micro = cfg.train.micro_batch_size
    rollouts = micro * getattr(m, "num_generations", 1) if isinstance(micro, int) else m.mini_batches
    if m.mini_batches < 1 or rollouts % m.mini_batches:
        raise ConfigError(
            f"method.mini_batches={m.mini_batches} must be >= 1 and divide the rollouts of a "
            f"micro-batch (train.micro_batch_size × completions per prompt = {rollouts})"
        )
    for key in ("epochs", "max_new_tokens"):
        if getattr(m, key) < 1:
            raise ConfigError(f"method.{key} must be >= 1 (got {getattr(m, key)})")
    if m.temperature <= 0:
        raise ConfigError(f"method.temperature must be > 0 (got {m.temperature})")
    if not 0 < m.clip_range < 1:
        raise ConfigError(f"method.clip_range must be in (0, 1) (got {m.clip_range})")
    if m.sft_warmup_steps < 0 or m.max_reward_failures < 0:
        raise ConfigError("method.sft_warmup_steps and method.max_reward_failures must be >= 0")
    from distft.methods.rl.env import validate_env

    validate_env(cfg)
    if getattr(m, "async_steps", 0) and m.name != "grpo":
        raise ConfigError(f"method.async_steps={m.async_steps} works with method=grpo; set it to 0")
    if not m.reward_funcs and not m.reward_model and not m.env:
        raise ConfigError(
            "no reward: set method.reward_funcs (e.g. [{_target_: distft.methods.rl.rewards.char_match}]) "
            "and/or method.reward_model (a method=reward export)"
        )
    for i, spec in enumerate(m.reward_funcs):
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(
                f"method.reward_funcs[{i}]={spec!r}: each entry needs _target_ (a dotted path to a "
                "callable), optionally weight and keyword arguments"
            )
    if m.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(
            f"method.max_new_tokens={m.max_new_tokens} leaves no room for the prompt in "
            f"data.max_length={cfg.data.max_length}; raise data.max_length"
        )
