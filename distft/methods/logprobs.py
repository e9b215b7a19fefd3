"""Log-probabilities of target tokens under a causal LM, shared by the preference and RL methods.

Labels follow the SFT convention: a row of token ids where `-100` marks positions that are not
scored; the logit at position t predicts the label at t+1. Built on TRL's
`selective_log_softmax` (gathers before normalizing, so the full log-softmax over the vocabulary
is never materialized).

    from distft.methods.logprobs import token_logps, sequence_logps, model_logps

    per_token, mask = token_logps(logits, labels)    # [N, T-1] each; mask is 1.0 on scored tokens
    total, count = sequence_logps(logits, labels)    # [N] summed log-prob and scored-token count
    total, count = model_logps(model, batch)         # forward of batch["input_ids"/"position_ids"]
"""

from __future__ import annotations

import torch

IGNORE = -100


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (float32) of `labels[:, 1:]` under `logits[:, :-1]`, and the float mask
    of scored tokens (unscored positions hold 0)."""
    from trl.trainer.utils import selective_log_softmax

    targets = labels[:, 1:]
    mask = (targets != IGNORE).float()
    index = targets.clamp(min=0)
    if logits.dtype in (torch.float32, torch.float64):
        logps = selective_log_softmax(logits[:, :-1], index, temperature=temperature)
    else:  # half precision: normalize each row in fp32, one row at a time to bound memory
        logps = torch.cat(
            [
                selective_log_softmax(row[None, :-1].float(), idx[None], temperature=temperature)
                for row, idx in zip(logits, index)
            ]
        )
    return logps.float() * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's scored tokens and how many there are (both [N], float32)."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def model_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a forward pass over a padded batch (input_ids, position_ids, labels)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return sequence_logps(out.logits, batch["labels"])
