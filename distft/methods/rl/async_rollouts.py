"""Asynchronous rollouts (`method.async_steps=N`): the rollouts of later steps are generated while
the current step trains.

A background thread on each rank generates with its own copy of the policy (the behaviour
policy), loaded with a snapshot of the policy's weights taken when the job is queued. When step
s starts, its rollouts are taken and the job for step s+N is queued with the weights of the
policy that is about to train step s, so rollouts are at most N updates old (`staleness`, logged
per step). The behaviour policy's token log-probs are kept with the rollouts and are the ratio's
denominator in the clipped update, so the importance weights π_θ/π_behaviour correct for the
lag. Requires unsharded policy weights (ddp, zero1, zero2): a sharded forward is a collective
that a second thread must not interleave with training's.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from distft.errors import ConfigError
from distft.methods.rl import loop


class AsyncRollouts:
    def __init__(self, ctx, scorer, copies: int):

        self.loop, self.ctx, self.scorer, self.copies = loop, ctx, scorer, copies
        self.n = int(ctx.cfg.method.async_steps)
        if ctx.strategy.sharded_params:
            raise ConfigError(
                f"method.async_steps={self.n} needs unsharded policy weights (strategy=ddp, zero1 or "
                f"zero2); strategy={ctx.cfg.strategy.name} shards them: set method.async_steps=0"
            )
        self.behaviour = copy.deepcopy(ctx.strategy.module).eval().requires_grad_(False)
        t = ctx.cfg.train
        self.total = t.max_steps or max(1, math.ceil(t.epochs * ctx.sampler.steps_per_epoch))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="distft-rollouts")
        self.jobs: dict[int, tuple[int, Future]] = {}

    def take(self, step: int):
        """The rollouts of `step` (0-based: the policy has had `step` updates)."""
        if not self.jobs:  # the first step (or the first after a resume): queue steps step..step+N-1
            for s in range(step, step + self.n):
                self._queue(s, step)
        self._queue(step + self.n, step)
        version, job = self.jobs.pop(step)
        batch = job.result()
        batch.stats["staleness"] = (float(step - version), 1)
        return batch

    def _queue(self, step: int, version: int) -> None:
        if step >= self.total or step in self.jobs:
            return
        examples, micro = self.loop.step_examples(self.ctx, step)  # the sampler's batch, as in sync mode
        weights = {k: v.detach().clone() for k, v in self.ctx.strategy.module.state_dict().items()}
        self.jobs[step] = (version, self.pool.submit(self._generate, weights, examples, micro))

    @torch.no_grad()
    def _generate(self, weights: dict, examples: list[dict], micro: int):
        from distft.methods.rl.rollout import token_logprobs

        self.behaviour.load_state_dict(weights)
        batch = self.loop.rollout_batch(
            self.ctx, self.scorer, examples, self.copies, micro, model=self.behaviour
        )
        dev, temp = self.ctx.info.device, self.ctx.cfg.method.temperature
        ids = batch.rollouts.input_ids
        batch.behaviour_logprobs = torch.cat(
            [
                token_logprobs(self.behaviour, ids[sl].to(dev), temp).cpu()
                for sl in self.loop.micro_slices(len(ids), batch.micro)
            ]
        )
        return batch
