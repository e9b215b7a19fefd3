"""Ring attention (strategy.cp_style=ring): each rank of a context-parallel group keeps its
query, key and value slices of the sequence; the key/value blocks travel round the group's ring
(each rank sends its current block to the next rank while it attends over it), and the per-block
softmax results are merged by their log-sum-exp, so the output is exact attention over the whole
sequence. Backward runs the ring again: the key/value blocks go round with their gradient
accumulators, which arrive back at their owners after a full turn.

Unlike all-gather context parallelism no rank ever holds the whole sequence's keys and values:
saved for backward are the rank's own q, k, v slices, its output and log-sum-exp, so attention
memory per rank falls with cp. The blocks are computed in fp32 with plain matmuls (CPU and GPU
alike; point-to-point sends over gloo or NCCL); blocks that the causal (and packing / sliding
window) mask hides entirely are skipped. Slices are contiguous, so later ranks attend over more
blocks than earlier ones (Ulysses splits heads and is balanced).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distft.errors import ConfigError
from distft.parallel import cp


def _exchange(group, send: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank of the ring and receiving the previous rank's."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % n),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % n),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _keep(meta: dict, src: int) -> torch.Tensor | None:
    """(B, 1, 1, c, c) mask of this rank's rows against block `src`'s columns; None if all hidden."""
    c, rank = meta["c"], meta["rank"]
    qi = torch.arange(rank * c, rank * c + c, device=meta["seg"].device)
    kj = torch.arange(src * c, src * c + c, device=qi.device)
    keep = (qi[:, None] >= kj[None, :])[None]
    if meta["window"]:
        keep = keep & (qi[:, None] - kj[None, :] < meta["window"])[None]
    seg = meta["seg"]
    keep = keep & (seg[:, rank * c : rank * c + c, None] == seg[:, None, src * c : src * c + c])
    return keep[:, None, None] if bool(keep.any()) else None


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """log-sum-exp with -inf (no key seen) as 0: exp(-inf - 0) = 0 instead of nan."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


class _Ring(torch.autograd.Function):
    """q (B, Hkv, G, c, D), k and v (B, Hkv, 1, c, D), fp32 → out (B, Hkv, G, c, D)."""

    @staticmethod
    def forward(ctx, q, k, v, meta):
        group, rank, n, scale = meta["group"], meta["rank"], meta["n"], meta["scale"]
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        kv = torch.stack([k, v])
        for step in range(n):
            src = (rank - step) % n
            pending = _exchange(group, kv, rank, n) if step < n - 1 else None
            keep = _keep(meta, src)
            if keep is not None:
                s = (q @ kv[0].transpose(-1, -2)) * scale
                s = s.masked_fill(~keep, float("-inf"))
                block = torch.logsumexp(s, -1)
                o = torch.exp(s - _safe(block)[..., None]) @ kv[1]
                new = _safe(torch.logaddexp(lse, block))
                out = out * torch.exp(lse - new)[..., None] + o * torch.exp(block - new)[..., None]
                lse = torch.logaddexp(lse, block)
            if pending is not None:
                kv, works = pending
                for w in works:
                    w.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        meta = ctx.meta
        group, rank, n, scale = meta["group"], meta["rank"], meta["n"], meta["scale"]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dO ∘ O)
        lse = _safe(lse)[..., None]
        dq = torch.zeros_like(q)
        # k, v and their gradient accumulators travel together; after n moves they are home.
        bundle = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
        for step in range(n):
            src = (rank - step) % n
            keep = _keep(meta, src)
            if keep is not None:
                kb, vb = bundle[0], bundle[1]
                s = (q @ kb.transpose(-1, -2)) * scale
                p = torch.exp(s.masked_fill(~keep, float("-inf")) - lse)
                dv = (p.transpose(-1, -2) @ dout).sum(2, keepdim=True)
                ds = p * (dout @ vb.transpose(-1, -2) - delta) * scale
                dq = dq + ds @ kb
                dk = (ds.transpose(-1, -2) @ q).sum(2, keepdim=True)
                bundle = torch.stack([kb, vb, bundle[2] + dk, bundle[3] + dv])
            bundle, works = _exchange(group, bundle, rank, n)
            for w in works:
                w.wait()
        return dq, bundle[2], bundle[3], None


def ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function, cp_style=ring: (B, H, L/cp, D) slices in, (B, L/cp, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = cp._STATE
    if state.group is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ConfigError("strategy.cp_style=ring: attention dropout is not supported; set it to 0")
    b, heads, c, d = query.shape
    kv_heads = key.size(1)
    meta = {
        "group": state.group,
        "rank": state.rank,
        "n": state.size,
        "c": c,
        "scale": scaling if scaling is not None else d**-0.5,
        "window": getattr(module, "sliding_window", None),
        "seg": cp.segments(),
    }
    q = query.float().reshape(b, kv_heads, heads // kv_heads, c, d)
    k, v = (t.float().unsqueeze(2).contiguous() for t in (key, value))
    out = _Ring.apply(q, k, v, meta).reshape(b, heads, c, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None
