"""Pieces of an RL step shared by PPO and GRPO: the step's prompts, rollouts and rewards, no-grad
forwards in micro-batches, the reward-failure budget, and metric reduction over ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distft.contracts import MethodContext
from distft.errors import ConfigError, DistftError
from distft.methods.rl.env import run_episodes
from distft.methods.rl.rewards import RewardScorer, Scores
from distft.methods.rl.rollout import Rollouts, generate_rollouts, token_logprobs
from distft.runtime import dist
from distft.strategies.step import add_parts, reduce_parts


@dataclass
class Batch:
    rollouts: Rollouts
    scores: Scores
    micro: int
    """Rollouts per micro-batch (the optimizer step runs train.grad_accum of them)."""
    stats: dict = field(default_factory=dict)
    """Extra (sum, count) metrics of the rollouts (env/* of multi-turn environments, staleness)."""
    behaviour_logprobs: torch.Tensor | None = None
    """Token log-probs of the policy that generated the rollouts when it lags the trained one
    (method.async_steps > 0): the update's importance-ratio denominator."""


def step_examples(ctx: MethodContext, step: int) -> tuple[list[dict], int]:
    """This rank's prompts of the step's global batch, and the prompts per micro-batch."""
    shares = ctx.rank_examples(step)
    return [e for share in shares for e in share], len(shares[0])


def rollout_batch(
    ctx: MethodContext, scorer: RewardScorer, examples: list[dict], copies: int, micro: int, model=None
) -> Batch:
    """`copies` sampled completions per prompt (grouped), scored; sampled from `model` (default:
    the policy)."""
    info, st = ctx.info, ctx.strategy
    model = st.module if model is None else model
    prompts = [e["prompt"] for e in examples for _ in range(copies)]
    prompt_ids = [e["prompt_ids"] for e in examples for _ in range(copies)]
    columns = [e["columns"] for e in examples for _ in range(copies)]
    if ctx.cfg.method.env:
        ep = run_episodes(model, ctx.tokenizer, columns, ctx.cfg, info.device, st.sharded_params)
        roll = ep.rollouts
        scores = scorer(
            roll.prompts, roll.completions, roll.completion_ids, roll.stopped, columns, ep.rewards
        )
        return Batch(roll, scores, micro * copies, ep.stats)
    roll = generate_rollouts(
        model, ctx.tokenizer, prompts, prompt_ids, ctx.cfg, info.device, st.sharded_params
    )
    scores = scorer(roll.prompts, roll.completions, roll.completion_ids, roll.stopped, columns)
    return Batch(roll, scores, micro * copies)


def micro_slices(n: int, micro: int) -> list[slice]:
    return [slice(i, i + micro) for i in range(0, n, micro)]


def minibatches(n: int, mini_batches: int, accum: int) -> list[list[slice]]:
    """The optimizer steps of one epoch over `n` rollouts: the rank's rollouts are its `accum`
    micro-batch shares of the global batch (contiguous, as the sampler lays them out); minibatch
    k takes the k-th chunk of each share, so every optimizer step sees the same global rows on any
    world size × grad-accum split (each rank's share is a share too)."""
    if n % (mini_batches * accum):
        raise ConfigError(
            f"method.mini_batches={mini_batches} does not divide a rank's {n} rollouts into "
            f"train.grad_accum={accum} equal micro-batches; pick a divisor of train.micro_batch_size"
        )
    share = n // accum
    chunk = share // mini_batches
    return [
        [slice(j * share + k * chunk, j * share + (k + 1) * chunk) for j in range(accum)]
        for k in range(mini_batches)
    ]


def update_batches(mb: list[slice], mask: torch.Tensor) -> list[dict]:
    """One update's micro-batches for `optimizer_step`: each a slice of the rollouts and its
    action-token count (the update's loss is normalized by the count over all ranks)."""
    return [{"sl": sl, "num_targets": float(mask[sl].sum())} for sl in mb]


@torch.no_grad()
def forward_logprobs(model, strategy, roll: Rollouts, micro: int, temperature: float, device) -> torch.Tensor:
    """Log-probs of the rollout tokens under `model`, in micro-batches (every rank runs the same
    number of forwards, as sharded weights need)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for sl in micro_slices(len(roll), micro):
            with strategy.accumulate(True):
                out.append(token_logprobs(model, roll.input_ids[sl].to(device), temperature).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


class FailureBudget:
    """Counts rollouts skipped because a reward failed, over all ranks and the whole run; stops
    the run with a clear error past `method.max_reward_failures`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0

    def add(self, scorer: RewardScorer, local: int, device) -> int:
        (step_total,) = dist.all_reduce_sum([float(local)], device)
        self.total += int(step_total)
        if self.total > self.limit:
            names = sorted({n for names in dist.all_gather_objects(sorted(scorer.warned)) for n in names})
            raise DistftError(
                f"reward failed on {self.total} rollouts so far (limit method.max_reward_failures="
                f"{self.limit}); failing: {', '.join(names) or 'non-finite values'}. Fix the reward "
                "function (it must return one finite float or None per completion) or raise the limit"
            )
        return int(step_total)


class Sums:
    """Metric (sum, count) pairs accumulated locally, averaged over all ranks in one collective."""

    def __init__(self):
        self.acc: dict[str, list[float]] = {}

    def add(self, name: str, total, count) -> None:
        add_parts(self.acc, {name: (total, count)})

    def merge(self, parts: dict) -> None:
        """Add a step's local (sum, count) pairs (StepResult.parts)."""
        add_parts(self.acc, parts)

    def reduce(self, device) -> dict[str, float]:
        return reduce_parts(self.acc, device)


def rollout_metrics(sums: Sums, batch: Batch, kl_seq: torch.Tensor) -> None:
    """Reward, KL and length metrics of a batch of rollouts (valid rollouts only)."""
    s, roll = batch.scores, batch.rollouts
    v = s.valid.to(torch.float64)
    n = float(v.sum())
    sums.add("reward", (s.total * v).sum(), n)
    for name, values in s.per_func.items():
        if len(s.per_func) > 1 or name != "reward":
            ok = torch.isfinite(values)
            sums.add(f"rewards/{name}", values[ok].sum(), int(ok.sum()))
    sums.add("kl", (kl_seq.double() * v).sum(), n)
    lengths = torch.tensor([len(c) for c in roll.completion_ids], dtype=torch.float64)
    sums.add("completion_length", lengths.sum(), len(lengths))
    sums.add("stopped", sum(roll.stopped), len(roll.stopped))
    for name, (total, count) in batch.stats.items():
        sums.add(name, total, count)
