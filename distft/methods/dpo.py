"""Direct preference optimization and its variants on prompt/chosen/rejected pairs.

`method.loss_type` (β = `method.beta`; Δ = chosen minus rejected; logratio = log π − log π_ref,
summed over completion tokens; avg = mean log-prob per completion token):
- sigmoid (DPO): −log σ(β Δlogratio), with optional label smoothing (conservative DPO)
- hinge (SLiC):  max(0, 1 − β Δlogratio)
- ipo:           (Δ(logratio / tokens) − 1/(2β))²
- simpo:         −log σ(β Δavg − γ), γ = `method.simpo_gamma`; reference-free
- orpo:          −avg_chosen − β log σ(Δ log-odds(avg)); reference-free (SFT term built in)

The loss is summed over pairs (the engine divides by the global pair count). Implicit rewards
(β·logratio, or β·avg for the reference-free losses) are logged as rewards/chosen,
rewards/rejected, rewards/margins and rewards/accuracy; held-out accuracy and margin are
evaluated before and after training.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distft.contracts import Method, MethodContext
from distft.data.preference import PairRows
from distft.errors import ConfigError
from distft.methods.logprobs import model_logps
from distft.methods.reference import (
    Reference,
    check_reference,
    held_out,
    map_examples,
    setup_reference,
    to_device,
)
from distft.models.generation import exact_match
from distft.parallel.cp import WHOLE
from distft.ranges import num

LossType = Literal["sigmoid", "hinge", "ipo", "simpo", "orpo"]
LOSS_TYPES = typing.get_args(LossType)
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig:
    name: str = "dpo"
    """Method."""
    loss_type: LossType = "sigmoid"
    """sigmoid (DPO), hinge, ipo, simpo or orpo."""
    beta: float = num(0.1, gt=0)
    """Strength of the preference term (DPO: the KL coefficient; ORPO: the odds-ratio weight)."""
    label_smoothing: float = num(0.0, ge=0, lt=0.5)
    """sigmoid only: assumed probability that a pair's label is flipped (conservative DPO), < 0.5."""
    simpo_gamma: float = num(0.5, ge=0)
    """simpo only: target reward margin γ."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training instead of in every step (no reference
    model is kept; with full tuning this saves the frozen copy)."""
    disable_dropout: bool = True
    """Turn dropout off in the policy, so policy and reference log-probs are comparable."""
    max_skip_fraction: float = num(0.05, ge=0, le=1)
    """Largest fraction of a split's rows that may be skipped (bad or identical pairs) before the
    run stops with an error."""


def pair_rewards(logps, ref, counts, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit chosen/rejected rewards from [2B] summed log-probs (chosen first)."""
    m = cfg.method
    c, r = logps.chunk(2)
    nc, nr = counts.clamp(min=1).chunk(2)
    if m.loss_type in REFERENCE_FREE:
        ac, ar = c / nc, r / nr
        if m.loss_type == "simpo":
            loss = -F.logsigmoid(m.beta * (ac - ar) - m.simpo_gamma)
        else:  # orpo: log-odds of the average token probability, log(p / (1 - p))
            ac_, ar_ = ac.clamp(max=-1e-6), ar.clamp(max=-1e-6)
            log_odds = (ac_ - ar_) - (torch.log(-torch.expm1(ac_)) - torch.log(-torch.expm1(ar_)))
            loss = -ac - m.beta * F.logsigmoid(log_odds)
        return loss, m.beta * ac.detach(), m.beta * ar.detach()
    rc, rr = ref.chunk(2)
    lc, lr = c - rc, r - rr
    delta = lc - lr
    if m.loss_type == "sigmoid":
        eps = m.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(m.beta * delta) - eps * F.logsigmoid(-m.beta * delta)
    elif m.loss_type == "hinge":
        loss = torch.relu(1 - m.beta * delta)
    else:  # ipo, length-normalized as in TRL (confirmed with the IPO authors)
        loss = (lc / nc - lr / nr - 1 / (2 * m.beta)) ** 2
    return loss, m.beta * lc.detach(), m.beta * lr.detach()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    n = chosen.numel()
    return {
        "rewards/chosen": (float(chosen.sum()), n),
        "rewards/rejected": (float(rejected.sum()), n),
        "rewards/margins": (float((chosen - rejected).sum()), n),
        "rewards/accuracy": (float((chosen > rejected).sum()), n),
    }


class DPO(PairRows, Method):
    config = DPOConfig
    auto_class = None  # AutoModelForCausalLM
    scored_head = True  # log-probs project only the completions (distft.methods.logprobs)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.ref: Reference | None = None
        self.data = None  # the run's encoded splits (set in setup)

    @staticmethod
    def validate(cfg) -> None:
        m = cfg.method
        if m.beta <= 0:
            raise ConfigError(f"method.beta={m.beta} must be > 0")
        if not 0 <= m.label_smoothing < 0.5:
            raise ConfigError(f"method.label_smoothing={m.label_smoothing} must be in [0, 0.5)")
        if m.label_smoothing and m.loss_type != "sigmoid":
            raise ConfigError("method.label_smoothing applies to method.loss_type=sigmoid only")
        if m.precompute_ref and m.loss_type in REFERENCE_FREE:
            raise ConfigError(
                f"method.precompute_ref=true with method.loss_type={m.loss_type}: this loss uses no "
                "reference model; drop precompute_ref"
            )
        if not 0 <= m.max_skip_fraction <= 1:
            raise ConfigError(f"method.max_skip_fraction={m.max_skip_fraction} must be in [0, 1]")
        check_reference(cfg, m.loss_type not in REFERENCE_FREE)

    def setup(self, ctx: MethodContext) -> None:
        """After the strategy wrapped the policy: build the reference (or precompute its log-probs)."""
        self.data = ctx.data
        needed = self.cfg.method.loss_type not in REFERENCE_FREE
        self.ref = setup_reference(ctx, self, _assign_pair, needed)

    def collate(self, examples: list[dict]) -> dict:
        # Under context parallelism the pair sums need whole rows (distft.parallel.cp.WHOLE).
        return {**super().collate(examples), WHOLE: True}

    def _ref_logps(self, batch: dict) -> torch.Tensor | None:
        return None if self.ref is None else self.ref.logps(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        ref = self._ref_logps(batch)  # first: no other forward between the policy's and its backward
        logps, counts = model_logps(model, batch, self.cfg.train.loss_chunks)
        loss, chosen, rejected = pair_rewards(logps, ref, counts, self.cfg)
        parts = reward_metrics(chosen, rejected)
        n = chosen.numel()
        parts["logps/chosen"] = (float(logps[:n].detach().sum()), n)
        parts["logps/rejected"] = (float(logps[n:].detach().sum()), n)
        return loss.sum(), parts

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], info, sharded: bool) -> dict:
        """Preference accuracy (chosen's implicit reward above rejected's) and mean margin on the
        held-out pairs; greedy exact match of the chosen answer where rows are text."""
        examples = held_out(self, rows)
        was_training = model.training
        model.eval()

        def rewards(chunk: list[dict]) -> list:
            batch = to_device(self.collate(chunk), info.device)
            logps, counts = model_logps(model, batch, self.cfg.train.loss_chunks)
            _, c, r = pair_rewards(logps, self._ref_logps(batch), counts, self.cfg)
            return list(zip(c.tolist(), r.tolist()))

        pairs = map_examples(examples, rewards, info, self.cfg.train.micro_batch_size)
        model.train(was_training)
        out = {}
        if pairs:
            out["accuracy"] = sum(c > r for c, r in pairs) / len(pairs)
            out["margin"] = sum(c - r for c, r in pairs) / len(pairs)
        text_rows = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str)]
        if self.cfg.train.eval_generate and text_rows and self.cfg.data.max_eval_generations:
            sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in text_rows]
            sft_rows = sft_rows[: self.cfg.data.max_eval_generations]
            out["exact_match"] = exact_match(model, self.tokenizer, sft_rows, self.cfg, info, sharded)
        return out


def _assign_pair(example: dict, row_logps: list[float]) -> None:
    example["ref_chosen"], example["ref_rejected"] = row_logps
