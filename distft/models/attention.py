"""Attention of packed rows without the wasted blocks (CPU, or wherever no flash-attention runs).

A packed row holds several examples, position ids restarting at each (distft.data.collate.pack).
transformers' sdpa attends over the whole row with a dense block-diagonal causal mask: for
1024-token rows of ~135-token examples most of that work is on masked blocks. `varlen_attention`
runs causal sdpa on each example's span alone (the same per-position sums, so the same outputs
and gradients within rounding) and hands every other call to transformers' sdpa unchanged.

Exactness guard: the mask transformers built for the forward (registered here as sdpa's own mask
function) must equal the causal-within-example mask the position ids imply; it is checked once
per forward (the layers share the mask object), so a model whose mask adds anything (a sliding
window shorter than an example, image tokens attending both ways, padding, a cache) keeps the
masked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN = "distft_varlen"
"""The attention implementation name registered with transformers."""

_cache: dict = {}  # the current forward's position ids -> spans; its mask -> whether it is exact


def use_for(model: torch.nn.Module, cfg, device: torch.device) -> bool:
    """Route `model`'s attention through `varlen_attention` where it pays: packed rows
    (data.packing), model.attn_implementation=sdpa, a CPU device (CUDA has flash-attention's
    varlen kernels: model.attn_implementation), no context or tensor parallelism (cp has its own
    attention functions; tp's sharded heads are left to sdpa), no train.compile (per-example
    shapes would recompile the blocks)."""
    if not (cfg.data.packing and cfg.model.attn_implementation == "sdpa" and device.type == "cpu"):
        return False
    if cfg.train.compile:
        return False
    if getattr(cfg.strategy, "cp", 1) * getattr(cfg.strategy, "tp", 1) > 1:
        return False
    if not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(ATTN)
    return True


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, varlen_attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)  # the masked path's mask: the fallback, and the guard


def spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each example in each row: a position id that does not continue the previous
    one starts an example (as transformers detects packing; padding continues the last run).
    Computed once per forward: the layers share the position ids' tensor."""
    hit = _cache.get("pos")
    if hit is not None and hit[0] is position_ids:
        return hit[1]
    rows = []
    width = position_ids.size(1)
    starts = torch.diff(position_ids, dim=-1) != 1
    for row in starts.cpu():
        cuts = (torch.nonzero(row).flatten() + 1).tolist()
        bounds = [0, *cuts, width]
        rows.append(list(zip(bounds[:-1], bounds[1:])))
    _cache["pos"] = (position_ids, rows)
    return rows


def _exact(mask: torch.Tensor, position_ids: torch.Tensor) -> bool:
    """Whether `mask` (B, 1, L, L) bool is exactly causal within the examples of `position_ids`."""
    hit = _cache.get("mask")
    if hit is not None and hit[0] is mask and hit[1] is position_ids:
        return hit[2]
    ok = mask.dtype == torch.bool and mask.dim() == 4 and mask.size(1) == 1
    if ok:
        b, n = max(mask.size(0), position_ids.size(0)), position_ids.size(1)
        seg = (torch.diff(position_ids.expand(b, -1), dim=-1) != 1).cumsum(-1)
        seg = torch.cat([seg.new_zeros(b, 1), seg], 1)
        idx = torch.arange(n, device=seg.device)
        want = (idx[:, None] >= idx[None, :]) & (seg[:, :, None] == seg[:, None, :])
        ok = mask.shape[2:] == (n, n) and bool(torch.equal(mask[:, 0].expand(b, n, n), want))
    _cache["mask"] = (mask, position_ids, ok)
    return ok


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: (B, H, L, D) in, (B, L, H, D) out; causal sdpa per packed
    example where that is exact (module docstring), transformers' sdpa otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    pos = kwargs.get("position_ids")
    b, _, length, _ = query.shape
    if (
        attention_mask is None  # no packing detected (sdpa's is_causal is already exact)
        or pos is None
        or pos.dim() != 2
        or key.size(2) != length
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or not getattr(module, "is_causal", True)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if pos.size(1) != length or pos.size(0) not in (1, b) or not _exact(attention_mask, pos):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = spans(pos)
    rows = []
    # split/unbind, not slicing: their backward joins the pieces' gradients once, where each
    # slice's backward would fill and add a zero tensor of the whole input
    # (4-D pieces: sdpa's CPU flash kernel takes (B, H, L, D) only)
    for r, (q, k, v) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        lengths = [e - s for s, e in bounds[r if len(bounds) > 1 else 0]]
        parts = [
            F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling)
            for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
        ]
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None
