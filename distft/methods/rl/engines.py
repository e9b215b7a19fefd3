"""Rollout engines (`method.rollout.engine`) and the train/rollout mismatch correction.

- `hf`: transformers' generate on the policy being trained (CPU and GPU); it returns the
  log-probs it sampled with (Rollouts.sample_logprobs).
- `vllm`: vLLM, GPU only. Validation refuses it on CPU nodes (cluster.gpus_per_node=0) and where
  vllm is not installed, in one line, before any rank starts.

The engine's log-probs and the trainer's (π_old, from a training forward) differ a little (kernels,
precision) or a lot (another engine, stale weights): truncated importance sampling multiplies
each token's policy term by min(π_old / π_sampler, method.tis_cap) (detached), and
`rollout/logprob_diff` logs the mean |log π_old − log π_sampler| over completion tokens.
"""

from __future__ import annotations

import importlib.util

import torch

from distft.errors import ConfigError

ENGINES = ("hf", "vllm")


def validate(cfg) -> None:
    m = cfg.method
    engine = m.rollout.get("engine", "hf")
    unknown = sorted(set(m.rollout) - {"engine"})
    if unknown:
        raise ConfigError(f"unknown key method.rollout.{unknown[0]}; valid: engine")
    if engine not in ENGINES:
        raise ConfigError(f"method.rollout.engine={engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "vllm" and cfg.cluster.gpus_per_node == 0:
        raise ConfigError(
            "method.rollout.engine=vllm runs only on GPUs (cluster.gpus_per_node=0 here); "
            "use method.rollout.engine=hf on CPU, or set cluster.gpus_per_node on a GPU node"
        )
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "method.rollout.engine=vllm needs the vllm package (pip install vllm on the GPU nodes); "
            "or use method.rollout.engine=hf"
        )
    if engine == "vllm":
        raise ConfigError(
            "method.rollout.engine=vllm is not wired into the RL loop in this version; "
            "use method.rollout.engine=hf"
        )
    if m.tis_cap is not None and m.tis_cap < 1:
        raise ConfigError(f"method.tis_cap={m.tis_cap} must be >= 1 (or null: no correction)")


def tis_weights(
    old_lp: torch.Tensor, sample_lp: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(truncated IS weights min(π_old/π_sampler, cap) — None without a cap —, Σ |log-prob
    difference| over mask, and the token count)."""
    diff = old_lp - sample_lp
    weights = None if cap is None else torch.clamp(torch.exp(diff), max=cap).detach()
    return weights, (diff.abs() * mask).sum(), mask.sum()
