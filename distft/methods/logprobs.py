"""Log-probabilities and losses of target tokens under a causal LM: the one place where the output
projection meets the labels (SFT's loss, the preference methods' log-probs, reference models).

Labels follow the SFT convention: a row of token ids where `-100` marks positions that are not
scored; the logit at position t predicts the label at t+1. Built on TRL's
`selective_log_softmax` (gathers before normalizing, so the full log-softmax over the vocabulary
is never materialized).

The output projection runs only on the positions whose next label is scored (completion tokens
under SFT's default, the chosen/rejected/KTO completions): a pre-hook on the model's output
head hands it the K scored rows of the final hidden states instead of all N×T, inside the
model's own forward (so every strategy's and adapter's hooks, soft-capping and logit scaling
apply as usual). Exact: the same logits for those rows, and the others were never scored. Where
the head does not see hidden states shaped like the labels (context parallelism's slices, models
that are not plain causal LMs) it runs on every position as before.

`chunks` > 0 (`train.loss_chunks`) computes the output projection and the per-token loss chunk by
chunk over the sequence, each chunk under `torch.utils.checkpoint`: the model returns its final
hidden states (the head runs on zero positions), and a chunk's full-vocabulary logits exist only
while that chunk is computed, in forward and again in backward. The head is called as a module,
so FSDP2's and ZeRO-3's hooks gather its weight.

    from distft.methods.logprobs import token_logps, sequence_logps, model_logps, model_nll

    per_token, mask = token_logps(logits, labels)    # [N, T-1] each; mask is 1.0 on scored tokens
    total, count = sequence_logps(logits, labels)    # [N] summed log-prob and scored-token count
    total, count = model_logps(model, batch, chunks) # forward of batch["input_ids"/"position_ids"]
    loss = model_nll(model, batch, chunks)           # summed cross-entropy of the scored tokens
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distft.errors import ConfigError

IGNORE = -100


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (float32) of `labels[:, 1:]` under `logits[:, :-1]`, and the float mask
    of scored tokens (unscored positions hold 0)."""
    targets = labels[:, 1:]
    mask = (targets != IGNORE).float()
    logps = _selective_logps(logits[:, :-1], targets.clamp(min=0), temperature)
    return logps.float() * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's scored tokens and how many there are (both [N], float32)."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM behind DeepSpeed / DDP (`.module`) and PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DeepSpeed engine, DDP
            model = model.module
        else:
            return model


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's output projection (under any wrapper), None for models without one."""
    lm = _causal_lm(model)
    get = getattr(lm, "get_output_embeddings", None)
    try:
        head = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) and getattr(lm, "base_model", lm) is not lm else None


def scored_logits(
    model: torch.nn.Module, inputs: dict, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward of `inputs` whose head runs only on the scored positions: (logits [K, V] of the K
    positions t with `labels[:, t + 1]` scored, row-major; their targets [K]). Falls back to every
    position, (logits[:, :-1] [N, T-1, V], labels[:, 1:]), when the head did not see plain hidden
    states of the labels' shape."""
    targets = labels[:, 1:]
    taken: list[torch.Tensor] = []  # the scored rows' targets, once the head took them

    def keep_scored(_module, args):
        h = args[0] if args else None
        if taken or type(h) is not torch.Tensor or h.dim() != 3:
            return None  # a DTensor, an unexpected caller: leave it whole
        rows, scored_targets, scored = _scored_rows(h, labels)
        if scored is None:
            return None  # a slice of the sequence (context parallelism): every position
        taken.append(scored_targets)
        return (rows, *args[1:])

    head = _output_head(model)
    handle = head.register_forward_pre_hook(keep_scored) if head is not None else None
    try:
        out = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    if taken:
        return out.logits.reshape(-1, out.logits.size(-1)), taken[0]
    return out.logits[:, :-1], targets


def _fsdp_owner(lm: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP2 module whose parameter group holds the head's weight when the head is not its own
    FSDP2 module (distft shards the root with the embedding, norm and head: tied weights cannot be
    split). The root gathers them only around its own forward, so the chunks, which run after it
    and again in backward, gather them explicitly; the root's post-backward reduces and reshards."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(head, FSDPModule):
        return None  # its own hooks gather it on every call
    path = next(name for name, module in lm.named_modules() if module is head)
    owners = [
        (name, module)
        for name, module in lm.named_modules()
        if isinstance(module, FSDPModule) and (not name or path.startswith(name + "."))
    ]
    return max(owners, key=lambda nm: len(nm[0]))[1] if owners else None


def model_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Final hidden states [N, T, H] of a forward through the outermost wrapper (so every
    strategy's and adapter's hooks run), and `project(h)`: the model's logits of `h` (at least
    float32).

    The head runs on zero positions (`logits_to_keep` = an empty index); the decoder's output is
    taken by a forward hook on the transformers base model."""
    lm = _causal_lm(model)
    config = lm.config
    for key in ("logit_scale", "logits_scaling"):  # Cohere / Granite rescale logits after the head
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ConfigError(
                f"train.loss_chunks: {type(lm).__name__} rescales its logits ({key}); set train.loss_chunks=0"
            )
    head = lm.get_output_embeddings()
    decoder = lm.base_model
    if head is None or decoder is lm:
        raise ConfigError(f"train.loss_chunks needs a causal LM with an output head, not {type(lm).__name__}")
    captured: list[torch.Tensor] = []

    def grab(_module, _args, out):
        captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = decoder.register_forward_hook(grab)
    try:
        empty = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=empty)
    finally:
        handle.remove()
    cap = getattr(config, "final_logit_softcapping", None)
    owner = _fsdp_owner(lm, head)

    def project(h: torch.Tensor) -> torch.Tensor:
        if owner is not None:  # gather the head with its FSDP2 group (a no-op while gathered)
            owner.unshard()
        logits = head(h)
        if logits.dtype not in (torch.float32, torch.float64):  # normalize half precision in fp32
            logits = logits.float()
        if cap:  # Gemma 2/3 soft-cap their logits after the head
            logits = torch.tanh(logits / cap) * cap
        return logits

    hidden = captured[-1]
    if hidden.size(1) == input_ids.size(1) - 1:  # context parallelism dropped the look-ahead token
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.size(0), 1, hidden.size(2))], 1)  # as cp's logits
    return hidden, project


def _chunked(
    project: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunks: int, fn: Callable
) -> list[torch.Tensor]:
    """`fn(logits, targets)` over `chunks` slices of the sequence ([N, T, H] hidden states) or of
    the scored rows ([K, H]); each slice's logits are recomputed in backward instead of saved."""

    def run(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fn(project(h), t)

    dim = hidden.dim() - 2
    return [
        checkpoint(run, h, t, use_reentrant=False)
        for h, t in zip(hidden.chunk(chunks, dim=dim), targets.chunk(chunks, dim=dim))
    ]


def _scored_rows(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden states, targets, mask): the K scored positions' rows ([K, H], [K], the [N, T-1]
    mask) when the hidden states line up with the labels, else the shifted sequences and None."""
    targets = labels[:, 1:]
    if hidden.shape[:2] != labels.shape:
        return hidden[:, :-1], targets, None
    scored = targets != IGNORE
    return hidden[:, :-1][scored], targets[scored], scored


def _selective_logps(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of `index` under `logits` ([..., V]); half precision is normalized in fp32 one
    sequence (or 1,024 rows) at a time to bound memory."""
    from trl.trainer.utils import selective_log_softmax

    if logits.dtype in (torch.float32, torch.float64):
        return selective_log_softmax(logits, index, temperature=temperature)
    step = 1 if logits.dim() == 3 else 1024
    return torch.cat(
        [
            selective_log_softmax(part.float(), idx, temperature=temperature)
            for part, idx in zip(logits.split(step), index.split(step))
        ]
    )


def _unflatten(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[K] values of the scored positions back into an [N, T-1] float32 tensor (0 elsewhere)."""
    return values.float().new_zeros(scored.shape).masked_scatter(scored, values.float())


def model_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor,
    chunks: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` of a forward pass (the head on scored positions only), chunked when `chunks` > 0."""
    mask = (labels[:, 1:] != IGNORE).float()
    if not chunks:
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        logits, targets = scored_logits(model, inputs, labels)
        if logits.dim() == 3:  # every position (see scored_logits)
            return _selective_logps(logits, targets.clamp(min=0), temperature).float() * mask, mask
        return _unflatten(_selective_logps(logits, targets, temperature), mask.bool()), mask
    hidden, project = model_hidden(model, input_ids, position_ids)
    rows, targets, scored = _scored_rows(hidden, labels)

    def logps(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _selective_logps(logits, index, temperature)

    parts = torch.cat(_chunked(project, rows, targets.clamp(min=0), chunks, logps), dim=rows.dim() - 2)
    if scored is None:
        return parts.float() * mask, mask
    return _unflatten(parts, scored), mask


def model_logps(model, batch: dict, chunks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a forward pass over a padded batch (input_ids, position_ids, labels)."""
    logps, mask = model_token_logps(
        model, batch["input_ids"], batch.get("position_ids"), batch["labels"], chunks
    )
    return logps.sum(-1), mask.sum(-1)


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def model_nll(model, batch: dict, chunks: int = 0, inputs: dict | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) of the batch's scored labels, the head run on the
    scored positions only. `inputs`: the forward's arguments when the batch carries more than text
    (images: every position, the model's own forward); default ids and positions."""
    labels = batch["labels"]
    if not chunks:
        if inputs is not None:
            out = model(**inputs)
            return _nll_sum(out.logits[:, :-1], labels[:, 1:])
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch.get("position_ids"),
            "use_cache": False,
        }
        return _nll_sum(*scored_logits(model, inputs, labels))
    hidden, project = model_hidden(model, batch["input_ids"], batch.get("position_ids"))
    rows, targets, _ = _scored_rows(hidden, labels)
    return torch.stack(_chunked(project, rows, targets, chunks, _nll_sum)).sum()
