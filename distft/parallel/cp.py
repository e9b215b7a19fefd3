"""Context parallelism (Ulysses; all-gather at the end of this file; ring in ring.py): each rank of a
context-parallel group holds a contiguous 1/cp slice of every sequence of the micro-batch;
around attention an all-to-all trades the sequence split for a head split (each rank then
attends over the full sequence for heads/cp heads, with the exact causal and packing mask), and
a second all-to-all trades it back. Everything else (embeddings, MLPs, norms, the output
projection and the loss) runs on the rank's slice, so activation memory per rank falls with cp.

How a batch flows (`shard_batch` before the step, the hooks `attach` puts on the model):
  - the batch is padded to a multiple of cp (padding continues the last position run and is never
    a target, as distft.data.collate does) and each rank keeps its slice plus the next token, so
    a method's usual shift (`logits[:, :-1]` against `labels[:, 1:]`) scores exactly the labels
    of its slice: every target is counted once over the group, `num_targets` is the slice's;
  - the model's forward drops that extra token, gathers the group's position ids (global, so
    rotary embeddings and packing boundaries are those of the whole sequence), and returns
    a zero logit row in its place (the method drops it with its shift);
  - the loss is a sum over the slice's targets: the step sums losses and target counts over all
    ranks (distft.strategies.step), and FSDP2 averages gradients over dp_shard × cp, so the update
    is the one of the unsplit batch.

Whole-row losses (DPO's pair log-prob sums, the RL methods' policy loss on prompt+completion
rows) need every token's log-prob of a row: their batches are marked `WHOLE` (or carry no token
keys, as the RL update's row slices) and stay whole on every rank of a cp group. Inside
`active(..., whole=True)` the model's forward splits its inputs itself (this rank's contiguous
1/cp of each row), runs the decoder split as above, and all-gathers the logits along the
sequence (autograd-aware: backward reduce-scatters, summing what every rank's loss asks of
this rank's slice). Every rank of the group then computes the same whole-row loss and counts
the same `num_targets`; the step sums both over all ranks, so the normalized loss is that of
one rank, and the gradient (cp equal losses, FSDP2's average over dp_shard × cp) is exact.
Attention and MLP activations fall with cp; the logits of these methods do not.

Only inside `active()` (the strategy's `split(batch)` around the loss of a sharded batch: training
steps and the held-out loss) is the model split; other forwards (generation, the export's probe)
run plain sdpa over whole sequences on each rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from distft.data.sft_format import IGNORE
from distft.errors import ConfigError
from distft.parallel.layout import STATE as _STATE
from distft.parallel.layout import chunk_count, positions_index, segments

ATTN = "distft_ulysses"
"""The attention implementation name registered with transformers (cp_style=ulysses)."""
ATTN_ALLGATHER = "distft_cp_allgather"
"""The one for cp_style=allgather."""
ATTN_RING = "distft_cp_ring"
"""The one for cp_style=ring (distft.parallel.ring)."""
SPLIT_KEYS = ("input_ids", "labels", "position_ids")
WHOLE = "cp_whole_rows"
"""Batch key (True): the method's loss needs whole rows (the model splits and gathers itself)."""


# ----------------------------------------------------------------------------- batch
def is_whole(batch: dict) -> bool:
    """A batch whose loss needs whole rows: marked `WHOLE`, or without token ids (the RL update's
    micro-batches are row slices of rollouts the loss reads itself)."""
    return bool(batch.get(WHOLE)) or "input_ids" not in batch


def _padded(x: torch.Tensor, to: int, fill=None, step: bool = False) -> torch.Tensor:
    """`x` (B, W) padded to width `to`: `fill`, continuing positions (`step`), or its last column."""
    extra = to - x.size(1)
    if extra <= 0:
        return x
    if fill is not None:
        return torch.cat([x, x.new_full((x.size(0), extra), fill)], 1)
    if step:
        return torch.cat([x, x[:, -1:] + torch.arange(1, extra + 1, dtype=x.dtype, device=x.device)], 1)
    return torch.cat([x, x[:, -1:].expand(-1, extra)], 1)


def shard_batch(batch: dict, rank: int, size: int, balanced: bool = False) -> dict:
    """This rank's part of every sequence (its chunks, `layout.chunks_of`) of a collated batch with
    input_ids, labels and position_ids, plus one trailing token the forward drops: its labels are
    shifted so that a method's usual `logits[:, :-1]` against `labels[:, 1:]` scores the target
    of each of its tokens, every target once over the group. Other keys are kept (num_tokens too:
    the strategy counts them once per group, distft.parallel.mesh.MeshShape.counts_tokens),
    num_targets is the part's. A whole-row batch (`is_whole`) is kept whole."""
    if is_whole(batch):
        return dict(batch)
    missing = [k for k in SPLIT_KEYS if k not in batch]
    if missing:
        raise ConfigError(
            f"strategy.cp>1 needs token batches with {', '.join(SPLIT_KEYS)}; missing {missing}"
        )
    ids, labels, pos = (batch[k] for k in SPLIT_KEYS)
    parts = chunk_count(size, balanced)
    width = -(-ids.size(1) // parts) * parts  # padding continues the last position run, never a target
    ids, pos = _padded(ids, width + 1), _padded(pos, width + 1, step=True)
    labels = _padded(labels, width + 1, fill=IGNORE)
    idx = positions_index(width, rank, size, balanced, ids.device)
    out = dict(batch)
    out["input_ids"] = torch.cat([ids[:, idx], ids[:, -1:]], 1)
    out["position_ids"] = torch.cat([pos[:, idx], pos[:, -1:]], 1)
    out["labels"] = torch.cat([labels.new_full((labels.size(0), 1), IGNORE), labels[:, idx + 1]], 1)
    out["num_targets"] = int((out["labels"][:, 1:] != IGNORE).sum())
    return out


def balanced(style: str) -> bool:
    """Whether `style` splits sequences into balanced chunks (`layout.chunks_of`): ring attention
    skips the chunk pairs a causal mask hides, so each rank needs early and late positions."""
    return style == "ring"


@contextlib.contextmanager
def active(group, size: int, whole: bool = False, balanced: bool = False):
    """Split forwards of models `attach`ed to run inside this block (one training step's
    micro-batch); `whole`: their inputs are whole rows (split here, logits gathered back);
    `balanced`: ranks hold two chunks each (`layout.chunks_of`; ring attention)."""
    _STATE.group, _STATE.size, _STATE.whole, _STATE.balanced = group, size, whole, balanced
    _STATE.rank = torch.distributed.get_rank(group)
    try:
        yield
    finally:
        _STATE.group, _STATE.positions, _STATE.masks = None, None, {}
        _STATE.whole = _STATE.balanced = False


# ----------------------------------------------------------------------------- model
def attach(model: torch.nn.Module, style: str = "ulysses") -> None:
    """Route `model`'s attention through the context-parallel function of `style` (ulysses,
    allgather or ring) and split its forward inside `active()`. `model` is what training calls forward on
    (a PEFT wrapper or the transformers model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from distft.parallel.ring import ring_attention

    styles = {
        "ulysses": (ATTN, ulysses_attention),
        "allgather": (ATTN_ALLGATHER, allgather_attention),
        "ring": (ATTN_RING, ring_attention),
    }
    name, fn = styles[style]
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)  # outside active(): sdpa's own masks
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    root.set_attn_implementation(name)
    model.register_forward_pre_hook(_split_inputs, with_kwargs=True, prepend=True)
    model.register_forward_hook(_restore_length)


def _split_inputs(module, args, kwargs):
    if _STATE.group is None:
        return None
    if args or "input_ids" not in kwargs or (kwargs.get("position_ids") is None and not _STATE.whole):
        raise RuntimeError("context parallelism needs forward(input_ids=..., position_ids=...) keywords")
    kwargs = dict(kwargs)
    if _STATE.whole:
        ids, local = _whole_slice(kwargs["input_ids"], kwargs.get("position_ids"))
        kwargs["input_ids"], kwargs["position_ids"] = ids, local
        kwargs.pop("attention_mask", None)  # the mask is built from the gathered positions
    else:
        kwargs["input_ids"] = kwargs["input_ids"][:, :-1]
        local = kwargs["position_ids"][:, :-1].contiguous()
        kwargs["position_ids"] = local
    parts = [torch.empty_like(local) for _ in range(_STATE.size)]
    torch.distributed.all_gather(parts, local, group=_STATE.group)
    _STATE.positions, _STATE.masks = _in_order(torch.cat(parts, 1)), {}
    return args, kwargs


def _in_order(x: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) gathered in rank order → sequence order (balanced chunks interleave)."""
    if not _STATE.balanced:
        return x
    n, width = _STATE.size, x.size(1)
    order = torch.cat([positions_index(width, r, n, True, x.device) for r in range(n)])
    return x[:, torch.argsort(order)]


def _whole_slice(ids: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's chunks of whole rows (padded to a multiple of the chunk count by repeating the
    last token with continuing positions; the padding's logits are cut after the gather)."""
    b, width = ids.shape
    if pos is None:
        pos = torch.arange(width, device=ids.device).expand(b, width)
    n = _STATE.size
    parts = chunk_count(n, _STATE.balanced)
    padded = -(-width // parts) * parts
    ids, pos = _padded(ids, padded), _padded(pos, padded, step=True)
    _STATE.width = width
    idx = positions_index(padded, _STATE.rank, n, _STATE.balanced, ids.device)
    return ids[:, idx], pos[:, idx].contiguous()


def _gather_seq(x: torch.Tensor) -> torch.Tensor:
    """(B, L/n, ...) slices of the group → (B, L, ...) (autograd: backward sums and scatters)."""
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    y = wait_tensor(all_gather_single_autograd(x.transpose(0, 1).contiguous(), 0, _STATE.group))
    return y.transpose(0, 1)


def _restore_length(module, args, output):
    if _STATE.group is None:
        return None
    if _STATE.whole:
        output.logits = _in_order(_gather_seq(output.logits))[:, : _STATE.width]
        return output
    logits = output.logits
    output.logits = torch.cat([logits, logits.new_zeros(logits.size(0), 1, logits.size(2))], 1)
    return output


def _mask(window: int | None) -> torch.Tensor | None:
    """Causal mask over the whole sequence that keeps packed examples apart (a position-id reset
    starts an example, as transformers detects packing), and a sliding window if the layer has
    one; None when plain causal attention is exact (sdpa's is_causal)."""
    if window in _STATE.masks:
        return _STATE.masks[window]
    pos = _STATE.positions
    seg = segments()
    mask = None
    if bool((seg[:, -1] != 0).any()) or window:
        n = pos.size(1)
        idx = torch.arange(n, device=pos.device)
        keep = idx[None, :, None] >= idx[None, None, :]
        if window:
            keep = keep & (idx[None, :, None] - idx[None, None, :] < window)
        mask = (keep & (seg[:, :, None] == seg[:, None, :]))[:, None]
    _STATE.masks[window] = mask
    return mask


def _all_to_all(x: torch.Tensor) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; dim 0 of the result is indexed by source rank (autograd-aware)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, _STATE.group))


def seq_to_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, L/n, D) sequence slices → (B, H/n, L, D) whole sequences for this rank's heads."""
    b, h, c, d = x.shape
    y = _all_to_all(x.reshape(b, n, h // n, c, d).transpose(0, 1))
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * c, d)


def heads_to_seq(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (B, H/n, L, D) → (B, H, L/n, D)."""
    b, hn, length, d = x.shape
    c = length // n
    y = _all_to_all(x.reshape(b, hn, n, c, d).permute(2, 0, 1, 3, 4))
    return y.transpose(0, 1).reshape(b, hn * n, c, d)


def ulysses_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: (B, H, L/cp, D) slices in, (B, L/cp, H, D) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _STATE.group is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    n = _STATE.size
    heads, kv_heads = query.size(1), key.size(1)
    if heads % n:
        raise ConfigError(f"strategy.cp={n} must divide the model's {heads} attention heads (Ulysses)")
    if kv_heads % n:  # too few key/value heads to split: repeat them to one per query head first
        key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    q, k, v = (seq_to_heads(t, n) for t in (query, key, value))
    if k.size(1) != q.size(1):
        k, v = repeat_kv(k, q.size(1) // k.size(1)), repeat_kv(v, q.size(1) // v.size(1))
    mask = _mask(getattr(module, "sliding_window", None))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
    )
    return heads_to_seq(out, n).transpose(1, 2).contiguous(), None


def allgather_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function, cp_style=allgather: each rank keeps its (B, H, L/cp, D)
    query slice and attends over the keys and values of the whole sequence, all-gathered along it
    (autograd-aware: backward reduce-scatters their gradients), with this slice's rows of the
    causal and packing mask. Exact like Ulysses, with no condition on the head counts; each rank
    holds whole-sequence K/V (ring attention passes them round in blocks instead: distft.parallel.ring)."""
    from torch.distributed._functional_collectives import all_gather_tensor_autograd, wait_tensor
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _STATE.group is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    k, v = (wait_tensor(all_gather_tensor_autograd(t.contiguous(), 2, _STATE.group)) for t in (key, value))
    if k.size(1) != query.size(1):
        k, v = repeat_kv(k, query.size(1) // k.size(1)), repeat_kv(v, query.size(1) // v.size(1))
    rows = query.size(2)
    lo = _STATE.rank * rows
    full = _mask(getattr(module, "sliding_window", None))
    if full is None:  # plain causal over the whole sequence: this slice's rows of it (once per forward)
        if "causal" not in _STATE.masks:
            idx = torch.arange(k.size(2), device=query.device)
            _STATE.masks["causal"] = (idx[:, None] >= idx[None, :])[None, None]
        full = _STATE.masks["causal"]
    out = F.scaled_dot_product_attention(
        query, k, v, attn_mask=full[:, :, lo : lo + rows], dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None
