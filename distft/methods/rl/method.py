"""What the prompt-based RL methods (`method=ppo`, `method=grpo`) share: prompt data, the
SFT-style loss used for eval, the reward scorer, the frozen reference and the failure budget.
Each method adds its own update (`train_step`) and state."""

from __future__ import annotations

from pathlib import Path

import torch

from distft.contracts import Method, MethodContext
from distft.methods.rl import loop, models, prompts
from distft.methods.rl.rewards import RewardScorer
from distft.methods.rl.warm_adapter import WarmAdapter


class PromptMethod(Method):
    auto_class = None  # AutoModelForCausalLM
    encode_chunks = True  # each prompt encodes alone (distft/data/encode.py encodes in chunks)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.scorer = None
        self.reference = None
        self.warm_adapter = None  # adapter tunings after a warm-up: the reference's adapter
        self.start_policy = None
        self.info = None
        self.failures = loop.FailureBudget(cfg.method.max_reward_failures)

    @staticmethod
    def default_rows(cfg) -> list[dict]:
        return prompts.default_rows(cfg)

    @staticmethod
    def encode(rows, tokenizer, cfg, train: bool):
        return prompts.encode(rows, tokenizer, cfg, train)

    def collate(self, examples: list[dict]) -> dict:
        return prompts.collate(examples, self.tokenizer.pad_token_id)

    def loss(self, model, batch: dict):
        return prompts.reference_nll(model, batch)

    def evaluate(self, model, rows, info, sharded: bool) -> dict:
        if not self.cfg.train.eval_generate:
            return {}
        return prompts.evaluate(model, self.tokenizer, self.scorer, rows, self.cfg, info, sharded)

    def setup_policy(self, ctx: MethodContext, with_reference: bool) -> None:
        """Start policy (after the SFT warm-up), scorer, and the reference when the KL needs one."""
        self.info = ctx.info
        self.start_policy = models.start_policy(ctx)
        self.scorer = RewardScorer(self.cfg, self.tokenizer, ctx.info.device, ctx.strategy.place_frozen)
        if with_reference:
            self.reference = models.load_reference(ctx, self.start_policy)
        warmed = self.cfg.method.sft_warmup_steps > 0 or ctx.resume_path is not None
        if with_reference and self.reference is None and warmed:  # the warm start, not the bare base
            self.warm_adapter = WarmAdapter(ctx.strategy.module, getattr(ctx.strategy, "engine", None))

    def save_state(self, path: Path) -> None:
        state = {"start_policy": self.start_policy, "reward_failures": self.failures.total}
        models.write_state(path, state, self.info)
        if self.warm_adapter is not None:
            self.warm_adapter.save(path, self.info.is_main)

    def load_state(self, path: Path) -> None:
        self.failures.total = int(models.read_state(path).get("reward_failures", 0))
        if self.warm_adapter is not None and not self.warm_adapter.load(path):
            self.warm_adapter = None  # a checkpoint from before the warm-up adapter was kept

    @torch.no_grad()
    def reference_logprobs(self, st, roll, micro: int) -> torch.Tensor:
        """Per-token log-probs of the reference: the frozen copy, or under LoRA/QLoRA the policy
        with its warm-up adapter swapped in, or (no warm-up) with its adapters disabled: no second
        copy of the weights."""
        dev, temp = self.info.device, self.cfg.method.temperature
        if self.reference is not None:
            return loop.forward_logprobs(self.reference, st, roll, micro, temp, dev)
        if self.warm_adapter is not None:
            with self.warm_adapter.active():
                return loop.forward_logprobs(st.model, st, roll, micro, temp, dev)
        with st.module.disable_adapter():
            return loop.forward_logprobs(st.model, st, roll, micro, temp, dev)
