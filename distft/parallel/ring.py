"""Ring attention (strategy.cp_style=ring): each rank of a context-parallel group keeps its
query, key and value slices of the sequence; the key/value blocks travel round the group's ring
(each rank sends its current block to the next rank while it attends over it), and the per-block
softmax results are merged by their log-sum-exp, so the output is exact attention over the whole
sequence. Backward runs the ring again: the key/value blocks go round with their gradient
accumulators, which arrive back at their owners after a full turn.

Unlike all-gather context parallelism no rank ever holds the whole sequence's keys and values:
saved for backward are the rank's own q, k, v slices, its output and log-sum-exp, so attention
memory per rank falls with cp. A block is computed in fp32 by the CPU flash-attention kernel
(which returns the log-sum-exp and takes it back in its backward, so no block's scores are kept),
or with plain matmuls elsewhere (GPU: correct, not a fused kernel); point-to-point sends over
gloo or NCCL. Chunks that the causal (and packing / sliding window) mask hides entirely are
skipped, and each rank holds two chunks of the sequence, one early and one late
(`layout.chunks_of`: rank r of n holds chunks r and 2n−1−r of 2n), so every rank attends over
about the same number of key/value positions under a causal mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distft.errors import ConfigError
from distft.parallel import layout


def _exchange(group, send: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank of the ring and receiving the previous rank's."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % n),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % n),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _keep(meta: dict, qa: int, kb: int):
    """What sequence chunk `qa`'s rows see of chunk `kb`'s columns: None (nothing), "all",
    "causal" (a diagonal chunk of plain causal attention) or a (B, 1, h, h) bool mask (packing,
    sliding window)."""
    if kb > qa:
        return None  # causal: later chunks are hidden whatever the packing
    if not meta["packed"] and not meta["window"]:
        return "causal" if kb == qa else "all"
    h = meta["h"]
    qi = torch.arange(qa * h, qa * h + h, device=meta["seg"].device)
    kj = torch.arange(kb * h, kb * h + h, device=qi.device)
    keep = (qi[:, None] >= kj[None, :])[None]
    if meta["window"]:
        keep = keep & (qi[:, None] - kj[None, :] < meta["window"])[None]
    seg = meta["seg"]
    keep = keep & (seg[:, qi, None] == seg[:, None, kj])
    return keep[:, None] if bool(keep.any()) else None


def _pairs(meta: dict, src: int):
    """(rows of q, columns of the block, mask) for each of this rank's chunks against each of
    rank `src`'s chunks that it sees anything of."""
    h, mine = meta["h"], layout.chunks_of(meta["rank"], meta["n"], meta["balanced"])
    theirs = layout.chunks_of(src, meta["n"], meta["balanced"])
    for a, qa in enumerate(mine):
        for b, kb in enumerate(theirs):
            keep = _keep(meta, qa, kb)
            if keep is not None:
                yield slice(a * h, a * h + h), slice(b * h, b * h + h), keep


def _fused(q: torch.Tensor) -> bool:
    """The CPU flash-attention kernel (it returns the log-sum-exp and has a backward taking it)."""
    return q.device.type == "cpu"


def _bias(keep, dtype) -> torch.Tensor | None:
    if not isinstance(keep, torch.Tensor):
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


TILE = 2**26
"""Elements of one tile's scores (B × H × rows × c) on the plain-matmul path: query rows are
taken in tiles of this size, so a block's scores never exist whole (256 MiB in fp32)."""


def _tiles(q: torch.Tensor, c: int) -> list[tuple[int, int]]:
    rows = max(1, TILE // max(q.size(0) * q.size(1) * c, 1))
    return [(r, min(r + rows, q.size(2))) for r in range(0, q.size(2), rows)]


def _scores(q, k, keep, scale, r0: int) -> torch.Tensor:
    """Masked scores of query rows r0.. (a tile) against one block's keys."""
    s = (q @ k.transpose(-1, -2)) * scale
    if _causal(keep):
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(diagonal=r0)
    elif isinstance(keep, torch.Tensor):
        keep = keep[..., r0 : r0 + s.size(-2), :]
    return s.masked_fill(~keep, float("-inf")) if isinstance(keep, torch.Tensor) else s


def _block(q, k, v, keep, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, c, D) over one block k, v (B, H, c, D): (out, lse (B, H, c));
    rows that see nothing of the block get lse -inf."""
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, _causal(keep), attn_mask=_bias(keep, q.dtype), scale=scale
        )
    else:
        outs, lses = [], []
        for r0, r1 in _tiles(q, k.size(2)):
            s = _scores(q[:, :, r0:r1], k, keep, scale, r0)
            lses.append(torch.logsumexp(s, -1))
            outs.append(torch.exp(s - _safe(lses[-1])[..., None]) @ v)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    if isinstance(keep, torch.Tensor):  # the fused kernel reports lse 0 for a row it masks whole
        lse = lse.masked_fill(~keep.any(-1), float("-inf"))
    return out, lse


def _block_grad(dout, q, k, v, out, lse, keep, scale):
    """Gradients of one block's share, given the whole attention's `out` and `lse`."""
    if _fused(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, _causal(keep), attn_mask=_bias(keep, q.dtype), scale=scale
        )
    dq, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for r0, r1 in _tiles(q, k.size(2)):
        rows = slice(r0, r1)
        p = torch.exp(_scores(q[:, :, rows], k, keep, scale, r0) - lse[:, :, rows, None])
        g = dout[:, :, rows]
        dv += p.transpose(-1, -2) @ g
        ds = p * (g @ v.transpose(-1, -2) - (g * out[:, :, rows]).sum(-1, keepdim=True)) * scale
        dq.append(ds @ k)
        dk += ds.transpose(-1, -2) @ q[:, :, rows]
    return torch.cat(dq, 2), dk, dv


def _causal(keep) -> bool:
    return isinstance(keep, str) and keep == "causal"


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """log-sum-exp with -inf (no key seen) as 0: exp(-inf - 0) = 0 instead of nan."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, c, D) → (B, Hkv·groups, c, D): each key/value head repeated for its query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, 1)


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `_expand` for gradients: the query heads' shares summed per key/value head."""
    b, h, c, d = t.shape
    return t if groups == 1 else t.reshape(b, h // groups, groups, c, d).sum(2)


class _Ring(torch.autograd.Function):
    """q (B, H, c, D), k and v (B, Hkv, c, D), fp32 → out (B, H, c, D); c is one or two chunks."""

    @staticmethod
    def forward(ctx, q, k, v, meta):
        group, rank, n, scale = meta["group"], meta["rank"], meta["n"], meta["scale"]
        groups = q.size(1) // k.size(1)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        kv = torch.stack([k, v])
        for step in range(n):
            src = (rank - step) % n
            pending = _exchange(group, kv, rank, n) if step < n - 1 else None
            kx, vx = _expand(kv[0], groups), _expand(kv[1], groups)
            for rows, cols, keep in _pairs(meta, src):
                o, block = _block(q[:, :, rows], kx[:, :, cols], vx[:, :, cols], keep, scale)
                new = torch.logaddexp(lse[:, :, rows], block)
                safe = _safe(new)
                old = torch.exp(lse[:, :, rows] - safe)[..., None]
                out[:, :, rows] = out[:, :, rows] * old + o * torch.exp(block - safe)[..., None]
                lse[:, :, rows] = new
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
        groups = q.size(1) // k.size(1)
        dout = dout.contiguous()
        dq = torch.zeros_like(q)
        # k, v and their gradient accumulators travel together; after n moves they are home.
        bundle = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
        for step in range(n):
            src = (rank - step) % n
            kx, vx = _expand(bundle[0], groups), _expand(bundle[1], groups)
            for rows, cols, keep in _pairs(meta, src):
                dqb, dk, dv = _block_grad(
                    dout[:, :, rows], q[:, :, rows], kx[:, :, cols], vx[:, :, cols],
                    out[:, :, rows], lse[:, :, rows], keep, scale,
                )  # fmt: skip
                dq[:, :, rows] += dqb
                bundle[2][:, :, cols] += _fold(dk, groups)
                bundle[3][:, :, cols] += _fold(dv, groups)
            bundle, works = _exchange(group, bundle, rank, n)
            for w in works:
                w.wait()
        return dq, bundle[2], bundle[3], None


def ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function, cp_style=ring: (B, H, L/cp, D) slices in, (B, L/cp, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = layout.STATE
    if state.group is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ConfigError("strategy.cp_style=ring: attention dropout is not supported; set it to 0")
    c, d = query.shape[2:]
    seg = layout.segments()
    meta = {
        "group": state.group,
        "rank": state.rank,
        "n": state.size,
        "balanced": state.balanced,
        "h": c // (2 if state.balanced else 1),  # chunk length
        "scale": scaling if scaling is not None else d**-0.5,
        "window": getattr(module, "sliding_window", None),
        "seg": seg,
        "packed": bool((seg[:, -1] != 0).any()),
    }
    q, k, v = (t.float().contiguous() for t in (query, key, value))
    out = _Ring.apply(q, k, v, meta).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None
