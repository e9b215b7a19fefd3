"""On-policy distillation (GKD, Agarwal et al. 2024): a student learns a frozen teacher's token
distributions on sequences the student itself samples.

Each step, a fraction `method.lmbda` of the prompts get a completion sampled from the student
(on-policy); the others keep the dataset's completion. On every completion token the loss is the
generalized Jensen-Shannon divergence between the student's and the teacher's next-token
distributions (both at `method.temperature`):

  m = (1 − β)·p_student + β·p_teacher
  GJSD_β = β·KL(p_teacher ‖ m) + (1 − β)·KL(p_student ‖ m)
  β=0: KL(teacher ‖ student) (forward), β=1: KL(student ‖ teacher) (reverse)

(TRL's GKDTrainer.generalized_jsd_loss convention). Token sums are normalized by the global
completion-token count, so world size and grad-accum do not change the update. The teacher is
loaded frozen and placed by the strategy (distft.methods.frozen); it must share the student's
vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distft.data.sft_format import IGNORE
from distft.dtypes import PRECISION_DTYPES
from distft.errors import ConfigError
from distft.methods.rl import loop
from distft.methods.rl.config import RLConfig
from distft.methods.rl.method import PromptMethod
from distft.methods.rl.rewards import RewardScorer
from distft.methods.rl.rollout import sample
from distft.ranges import num
from distft.runtime import dist
from distft.strategies.step import StepResult


@dataclass
class DistillConfig(RLConfig):
    name: str = "distill"
    """Method."""
    teacher: str | None = None
    """The teacher: a Hugging Face causal-LM directory or hub id with the student's vocabulary."""
    lmbda: float = num(0.5, ge=0, le=1)
    """Fraction of prompts whose completion the student samples (on-policy); the rest use the
    dataset's completion."""
    beta: float = num(0.5, ge=0, le=1)
    """Generalized JSD interpolation: 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher)."""
    sft_warmup_steps: int = 0
    """No SFT warm-up: the teacher teaches from the first step."""
    lr_scale: float = 1.0
    """Student learning rate = train.lr × lr_scale."""


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
):
    """Per-position generalized JSD over the vocabulary (last dim): [..., V] -> [...]."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32
    s = F.log_softmax(student_logits.to(dtype) / temperature, -1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


class Distill(PromptMethod):
    config = DistillConfig

    @staticmethod
    def validate(cfg) -> None:
        m = cfg.method
        if not m.teacher:
            raise ConfigError("method=distill needs method.teacher=<a causal-LM directory or hub id>")
        if m.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0 (got {m.temperature})")
        if m.max_new_tokens >= cfg.data.max_length:
            raise ConfigError(
                f"method.max_new_tokens={m.max_new_tokens} leaves no room for the prompt in "
                f"data.max_length={cfg.data.max_length}; raise data.max_length"
            )

    def setup(self, ctx) -> None:
        self.info = ctx.info
        self.start_policy = ctx.model_path
        self.scorer = RewardScorer(self.cfg, self.tokenizer, ctx.info.device, ctx.strategy.place_frozen)
        self.teacher = ctx.load_frozen(
            self.cfg.method.teacher, None, PRECISION_DTYPES[self.cfg.train.precision]
        )
        want, have = ctx.strategy.module.config.vocab_size, self.teacher.config.vocab_size
        if want != have:
            raise ConfigError(
                f"method.teacher={self.cfg.method.teacher!r} has a vocabulary of {have} tokens, the student "
                f"{want}: distillation compares token distributions, so they must share the tokenizer"
            )

    def train_step(self, ctx, step: int) -> StepResult:
        m, dev, st, tok = self.cfg.method, ctx.info.device, ctx.strategy, self.tokenizer
        examples, micro = loop.step_examples(ctx, step)
        rng = random.Random(f"{self.cfg.train.seed}:{step}:{ctx.info.rank}")
        on = [rng.random() < m.lmbda for _ in examples]
        picked = [e for e, o in zip(examples, on) if o]
        (any_on,) = dist.all_reduce_sum([float(len(picked))], dev)
        sampled: list[list[int]] = []
        if any_on and (picked or st.sharded_params):  # sharded weights: every rank generates
            prompts = [e["prompt_ids"] for e in picked] or [examples[0]["prompt_ids"]]
            sampled, _ = sample(st.module, tok, prompts, self.cfg, dev, st.sharded_params)
        seqs, masks, it = [], [], iter(sampled)
        for e, o in zip(examples, on):
            if o:
                p = e["prompt_ids"]
                ids = p + next(it)
                mask = [0.0] * (len(p) - 1) + [1.0] * (len(ids) - len(p))
            else:  # the dataset's completion: its SFT labels mark the completion tokens
                ids = list(e["input_ids"])
                mask = [float(lab != IGNORE) for lab in e["labels"][1:]]
            seqs.append(ids)
            masks.append(mask)
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width - 1))
        for i, (ids, mk) in enumerate(zip(seqs, masks)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(mk)] = torch.tensor(mk)

        def loss_fn(model, b: dict) -> tuple[torch.Tensor, dict]:
            sl = b["sl"]
            ids, mk = input_ids[sl].to(dev), mask[sl].to(dev)
            student = model(input_ids=ids).logits[:, :-1]
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids).logits[:, :-1]
            per_token = generalized_jsd(student, teacher, m.beta, m.temperature)
            return (per_token * mk).sum(), {}

        batches = loop.update_batches(loop.micro_slices(len(seqs), micro), mask)
        r = ctx.run_step(batches, loss_fn, ctx.lr_at(step) * m.lr_scale, loss_hook=ctx.fault_hook(step))
        sums = loop.Sums()
        sums.add("on_policy", float(sum(on)), len(on))
        sums.add("completion_length", float(mask.sum()), len(seqs))
        (tokens,) = dist.all_reduce_sum([float((input_ids != tok.pad_token_id).sum())], dev)
        return StepResult(r.loss, int(tokens), r.grad_norm, {**r.metrics, **sums.reduce(dev)})
