"""SFT examples from the tokens cleaning kept straight to Arrow tables (the encoder's hot path).

`SFT.encode` (distft/methods/sft.py) turns each row's SftTokens into Python lists (EOS appended,
the first label ignored, truncated to data.max_length, rows left without a target dropped) and the
row writer turns the lists back into arrays. For a chunk whose rows all carry their SftTokens this
does the same on flat numpy arrays: the same tables (`rows.unpacked_token_table`, batches of
rows.BATCH examples as `RowWriter.add` cuts them), example lengths and stats, about 100 ns a token
less (tests/test_data_sft_arrow.py compares it with SFT.encode and RowWriter). A method opts in
with `encodes_sft_tokens = True` (its encode is that one).
"""

from __future__ import annotations

import numpy as np

from distft.data.rows import BATCH, unpacked_token_table
from distft.data.sft_format import SftTokens


def sft_tables(
    tokens: list[SftTokens], eos: int | None, max_length: int, train_on_prompt: bool
) -> tuple[list[tuple[str, object]], np.ndarray, dict] | None:
    """(encoding, table) per batch of kept examples, their lengths, and SFT.encode's stats; None
    when an id does not fit the token encodings (the caller takes the list path)."""
    n = len(tokens)
    counts = np.fromiter((len(t.ids) for t in tokens), dtype=np.int64, count=n)
    add = np.fromiter((t.add_eos for t in tokens), dtype=bool, count=n) & (eos is not None)
    full = counts + add
    ids_parts: list = []
    target_parts: list = []
    eos_id, true = np.full(1, -1 if eos is None else eos, dtype=np.int64), np.ones(1, dtype=bool)
    for t, a in zip(tokens, add.tolist()):
        ids_parts.append(t.ids)
        target_parts.append(t.targets)
        if a:  # EOS is appended, and always a target
            ids_parts.append(eos_id)
            target_parts.append(true)
    total = int(full.sum())
    ids = np.concatenate(ids_parts).astype(np.int64, copy=False) if total else np.zeros(0, np.int64)
    targets = np.concatenate(target_parts).astype(bool) if total else np.zeros(0, bool)
    if train_on_prompt:
        targets = np.ones(total, dtype=bool)
    starts = np.cumsum(full) - full
    targets[starts[full > 0]] = False  # the first token has no previous token to predict it from
    row_of = np.repeat(np.arange(n), full)
    inside = np.arange(total) - starts[row_of] < max_length  # truncation
    has_target = np.zeros(n, dtype=bool)
    has_target[row_of[targets & inside]] = True
    keep = inside & has_target[row_of]
    ids, targets = ids[keep], targets[keep]
    lengths = np.minimum(full, max_length)[has_target]
    ordered = np.sort(lengths)
    stats = {
        "truncated": int((full > max_length).sum()),
        "dropped_no_target": int(n - has_target.sum()),
        "tokens_p50": int(ordered[len(ordered) // 2]) if len(ordered) else 0,
        "tokens_max": int(ordered[-1]) if len(ordered) else 0,
    }
    offsets = np.r_[0, np.cumsum(lengths)]
    tables = []
    for a in range(0, len(lengths), BATCH):
        b = min(a + BATCH, len(lengths))
        lo, hi = offsets[a], offsets[b]
        table = unpacked_token_table(offsets[a : b + 1] - lo, ids[lo:hi], targets[lo:hi])
        if table is None:
            return None
        tables.append(table)
    return tables, lengths, stats
