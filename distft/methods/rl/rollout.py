"""Rollouts: sample completions from the policy, then lay them out for training.

Generation runs on left-padded prompts (transformers derives positions from the attention
mask). Training forwards run on the same tokens right-padded — prompt, completion, padding — so
a causal model needs no mask and action tokens are one contiguous span per row. With sharded
weights (ZeRO-3, FSDP2) every rank must run the same number of forwards: `synced_gpus` keeps
ranks generating until the last one is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import selective_log_softmax

from distft.dtypes import PRECISION_DTYPES
from distft.models.generation import generation_mode


@dataclass
class Rollouts:
    input_ids: torch.Tensor
    """[B, T] prompt + completion, right-padded."""
    mask: torch.Tensor
    """[B, T-1] 1.0 where input_ids[:, 1:] is a completion token (incl. EOS), else 0."""
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    stopped: list[bool]
    """Whether the completion ended with EOS (not cut at max_new_tokens)."""

    def __len__(self) -> int:
        return len(self.completions)


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    prompt_ids: list[list[int]],
    cfg,
    device,
    synced: bool,
    greedy: bool = False,
) -> Rollouts:
    m = cfg.method
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    sampling = {"do_sample": False}
    if not greedy:  # sample from the full distribution: the log-probs used in training are of that
        sampling = {"do_sample": True, "temperature": m.temperature, "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    try:
        with generation_mode(model, PRECISION_DTYPES[cfg.train.precision]):  # sharded weights gathered once
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=m.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                synced_gpus=synced,
                **sampling,
            )
    finally:
        model.train(was_training)
    new = out[:, width:].cpu().tolist()
    completion_ids, stopped = [], []
    for row in new:
        if eos in row:
            completion_ids.append(row[: row.index(eos) + 1])
            stopped.append(True)
        else:
            completion_ids.append(row)
            stopped.append(False)
    return layout(tokenizer, prompts, prompt_ids, completion_ids, stopped)


def layout(tokenizer, prompts, prompt_ids, completion_ids, stopped) -> Rollouts:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1))
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) - 1 : len(s) - 1] = 1.0
    texts = tokenizer.batch_decode(
        [[t for t in c if t != eos] for c in completion_ids], skip_special_tokens=True
    )
    return Rollouts(input_ids, mask, list(prompts), texts, completion_ids, stopped)


def token_logprobs(model, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token_t+1 | tokens ≤ t) for every position: [B, T-1] (float32)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    return selective_log_softmax(logits.float(), input_ids[:, 1:], temperature)


def token_values(critic, input_ids: torch.Tensor) -> torch.Tensor:
    """The critic's value of the state before each next token: [B, T-1] (float32)."""
    return critic(input_ids=input_ids).logits[:, :-1, 0].float()
