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
    """[B, T-1] 1.0 where input_ids[:, 1:] is a completion token the policy generated (incl. EOS),
    else 0 (prompt, padding, and tokens an environment appended: tool results)."""
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    stopped: list[bool]
    """Whether the completion ended with EOS (not cut at max_new_tokens)."""
    sample_logprobs: torch.Tensor | None = None
    """[B, T-1] log-probs the rollout engine sampled each completion token with (laid out as
    mask; 0 elsewhere), or None: the train/rollout mismatch correction (method.tis_cap) uses them."""

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
    completion_ids, stopped, lps = sample_with_logprobs(
        model, tokenizer, prompt_ids, cfg, device, synced, greedy
    )
    roll = layout(tokenizer, prompts, prompt_ids, completion_ids, stopped)
    if lps is not None:  # laid out as the mask: the completion's tokens, 0 elsewhere
        roll.sample_logprobs = torch.zeros_like(roll.mask)
        for i, (p, lp) in enumerate(zip(prompt_ids, lps)):
            roll.sample_logprobs[i, len(p) - 1 : len(p) - 1 + len(lp)] = lp
    return roll


def sample(
    model, tokenizer, prompt_ids: list[list[int]], cfg, device, synced: bool, greedy: bool = False
) -> tuple[list[list[int]], list[bool]]:
    """Completions of `prompt_ids` (each cut after its first EOS) and whether each stopped there."""
    completion_ids, stopped, _ = sample_with_logprobs(
        model, tokenizer, prompt_ids, cfg, device, synced, greedy
    )
    return completion_ids, stopped


@torch.no_grad()
def sample_with_logprobs(
    model, tokenizer, prompt_ids: list[list[int]], cfg, device, synced: bool, greedy: bool = False
) -> tuple[list[list[int]], list[bool], list[torch.Tensor] | None]:
    """`sample`, plus each completion's log-probs under the sampler (None when greedy)."""
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
                output_logits=not greedy,
                return_dict_in_generate=True,
                **sampling,
            )
    finally:
        model.train(was_training)
    new = out.sequences[:, width:].cpu().tolist()
    completion_ids, stopped = [], []
    for row in new:
        if eos in row:
            completion_ids.append(row[: row.index(eos) + 1])
            stopped.append(True)
        else:
            completion_ids.append(row)
            stopped.append(False)
    lps = None
    if not greedy:  # the sampler's own log-probs (temperature applied, as it sampled)
        steps = torch.stack(out.logits, 1).float().cpu()
        lp = selective_log_softmax(steps, out.sequences[:, width:].cpu(), m.temperature)
        lps = [lp[i, : len(c)] for i, c in enumerate(completion_ids)]
    return completion_ids, stopped, lps


def layout(tokenizer, prompts, prompt_ids, completion_ids, stopped, actions=None, texts=None) -> Rollouts:
    """Right-padded rollouts. `actions` (optional, per completion token): 1 where the policy
    generated the token, 0 where an environment appended it (a tool result): those take no part
    in the loss. `texts`: the completions as reward functions see them (default: decoded)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1))
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        if actions is None:
            mask[i, len(p) - 1 : len(s) - 1] = 1.0
        else:
            mask[i, len(p) - 1 : len(s) - 1] = torch.tensor(actions[i], dtype=mask.dtype)
    if texts is None:
        texts = tokenizer.batch_decode(
            [[t for t in c if t != eos] for c in completion_ids], skip_special_tokens=True
        )
    return Rollouts(input_ids, mask, list(prompts), list(texts), completion_ids, stopped)


def token_logprobs(model, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token_t+1 | tokens ≤ t) for every position: [B, T-1] (float32)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    return selective_log_softmax(logits.float(), input_ids[:, 1:], temperature)


def token_values(critic, input_ids: torch.Tensor) -> torch.Tensor:
    """The critic's value of the state before each next token: [B, T-1] (float32)."""
    return critic(input_ids=input_ids).logits[:, :-1, 0].float()
