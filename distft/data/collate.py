"""Packing and padding of tokenized examples into micro-batches."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from distft.data.sft_format import IGNORE, Tokenized


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing on lengths only: each example, longest first, goes into the open bin it
    fills most tightly (a new bin when none has room). Returns bins of example indices, each in
    ascending order. O(n log capacity): open bins are kept in buckets by their free space."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free_sizes: list[int] = []  # sorted distinct free spaces that some open bin has
    by_free: dict[int, list[int]] = {}  # free space -> bins with it
    bins: list[list[int]] = []
    for i in order:
        n = min(lengths[i], capacity)
        at = bisect.bisect_left(free_sizes, n)
        if at < len(free_sizes):
            free = free_sizes[at]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_sizes.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_sizes, left)
            by_free[left].append(b)
    return [sorted(b) for b in bins]


def packing_efficiency(lengths: Sequence[int], bins: int, capacity: int) -> float:
    """Non-padding share of the packed sequences (each padded to capacity)."""
    return sum(lengths) / (bins * capacity) if bins else 0.0


def pack(examples: list[Tokenized], max_length: int) -> list[dict]:
    """Bin-packed sequences of up to max_length tokens (`pack_bins`); inside a sequence the
    examples keep their order and position ids restart per example, so attention
    (transformers' packed-sequence masks) never crosses example boundaries."""
    packed: list[dict] = []
    for b in pack_bins([len(ex.input_ids) for ex in examples], max_length):
        cur = {"input_ids": [], "labels": [], "position_ids": []}
        for i in b:
            ex = examples[i]
            cur["input_ids"] += ex.input_ids
            cur["labels"] += ex.labels
            cur["position_ids"] += list(range(len(ex.input_ids)))
        packed.append(cur)
    return packed


def as_row(ex: Tokenized) -> dict:
    n = len(ex.input_ids)
    return {"input_ids": ex.input_ids, "labels": ex.labels, "position_ids": list(range(n))}


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding continues the last position run (so it never opens
    a packed segment that real tokens attend to) and is never a target."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        extra = width - len(r["input_ids"])
        last = r["position_ids"][-1] if r["position_ids"] else -1
        ids.append(r["input_ids"] + [pad_id] * extra)
        labels.append(r["labels"] + [IGNORE] * extra)
        pos.append(r["position_ids"] + list(range(last + 1, last + 1 + extra)))
    labels_t = torch.tensor(labels)
    return {
        "input_ids": torch.tensor(ids),
        "labels": labels_t,
        "position_ids": torch.tensor(pos),
        "num_targets": int((labels_t[:, 1:] != IGNORE).sum()),
        "num_tokens": sum(len(r["input_ids"]) for r in rows),
    }
