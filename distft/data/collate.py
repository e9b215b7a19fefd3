"""Packing and padding of tokenized examples into micro-batches."""

from __future__ import annotations

import torch

from distft.data.sft_format import IGNORE, Tokenized


def pack(examples: list[Tokenized], max_length: int) -> list[dict]:
    """Greedy first-fit-in-order packing; position ids restart per example so attention
    (transformers' packed-sequence masks) never crosses example boundaries."""
    packed: list[dict] = []
    cur = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex.input_ids)
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex.input_ids
        cur["labels"] += ex.labels
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
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
