"""Reward model: a one-output sequence-classification head on the causal LM backbone, trained on
prompt/chosen/rejected pairs with the Bradley–Terry loss −log σ(r_chosen − r_rejected − margin).

The score of a sequence is the head's output at its last non-padding token (transformers finds it
from `config.pad_token_id`, which is always set). Sequences end with EOS, as in training, so a
user scores `prompt + completion + eos_token`. Under LoRA / QLoRA the score head is trained in
full and saved with the adapter (PEFT's sequence-classification task, `modules_to_save`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distft.contracts import Method, MethodContext
from distft.data.preference import PairRows
from distft.errors import ConfigError
from distft.methods.dpo import reward_metrics
from distft.methods.reference import held_out, map_examples, to_device
from distft.ranges import num


@dataclass
class RewardConfig:
    name: str = "reward"
    """Method."""
    center_rewards_coefficient: float = num(0.0, ge=0)
    """Weight of (r_chosen + r_rejected)² in the loss, which keeps rewards centred on 0."""
    max_skip_fraction: float = num(0.05, ge=0, le=1)
    """Largest fraction of a split's rows that may be skipped (bad or identical pairs) before the
    run stops with an error."""


class ScoreModel:
    """`AutoModelForSequenceClassification` with one output and the tokenizer's pad token id in its
    config (transformers reads each sequence's score at its last non-pad token); used for
    training and for export, so both agree."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        trust = kwargs.get("trust_remote_code", False)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        config.num_labels = 1
        try:  # the pad id distft trains with: the tokenizer's pad token, else its EOS
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        except (OSError, ValueError):  # weights without a tokenizer: keep the config's
            pad = None
        if pad is not None:
            config.pad_token_id = pad
        return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)


def scores(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return out.logits.float().squeeze(-1)


class Reward(PairRows, Method):
    config = RewardConfig
    auto_class = ScoreModel

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.data = None  # the run's encoded splits (set in setup)

    @staticmethod
    def validate(cfg) -> None:
        m = cfg.method
        if m.center_rewards_coefficient < 0:
            raise ConfigError(
                f"method.center_rewards_coefficient={m.center_rewards_coefficient} must be >= 0"
            )
        if not 0 <= m.max_skip_fraction <= 1:
            raise ConfigError(f"method.max_skip_fraction={m.max_skip_fraction} must be in [0, 1]")

    def setup(self, ctx: MethodContext) -> None:
        self.data = ctx.data
        config = ctx.strategy.module.config
        if config.pad_token_id != self.tokenizer.pad_token_id:
            raise ConfigError(
                f"the reward model's pad_token_id ({config.pad_token_id}) differs from the tokenizer's "
                f"({self.tokenizer.pad_token_id}); sequence scores would be read at the wrong token"
            )

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = scores(model, batch).chunk(2)
        margin = batch.get("margins", 0.0)
        loss = -F.logsigmoid(chosen - rejected - margin)
        coef = self.cfg.method.center_rewards_coefficient
        if coef:
            loss = loss + coef * (chosen + rejected) ** 2
        return loss.sum(), reward_metrics(chosen.detach(), rejected.detach())

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], info, sharded: bool) -> dict:
        """Pairwise accuracy (r_chosen > r_rejected) and mean margin on the held-out pairs."""
        examples = held_out(self, rows)
        was_training = model.training
        model.eval()

        def pair_scores(chunk: list[dict]) -> list:
            batch = to_device(self.collate(chunk), info.device)
            c, r = scores(model, batch).chunk(2)
            return list(zip(c.tolist(), r.tolist()))

        pairs = map_examples(examples, pair_scores, info, self.cfg.train.micro_batch_size)
        model.train(was_training)
        if not pairs:
            return {}
        return {
            "accuracy": sum(c > r for c, r in pairs) / len(pairs),
            "margin": sum(c - r for c, r in pairs) / len(pairs),
        }
