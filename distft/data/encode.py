"""Encode a split into an Arrow file in bounded memory, with data.num_proc worker processes.

Row-wise encoders (the SFT kind: each row becomes one example, the stats are counts) run over
chunks of CHUNK rows, in forked workers when data.num_proc > 1, and each chunk is written as soon
as it is done, so the token lists of the split never exist at once. Packing then works on the
lengths alone (`pack_bins`) and assembles sequences from the memory-mapped unpacked file. The
result is the same as one `method.encode` call on the whole split (tests check it), whatever
num_proc is. Other methods (whose encode looks at the whole split, e.g. a skip-fraction check)
are encoded in one call, then written.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path

from distft.data.collate import pack_bins
from distft.data.rows import Rows, RowWriter, write_rows

CHUNK = 2000
_WORKER: dict = {}


def _init(method, tokenizer, cfg, train: bool) -> None:
    _WORKER.update(method=method, tokenizer=tokenizer, cfg=cfg, train=train)


def _encode_chunk(rows: list[dict]) -> tuple[list[dict], dict]:
    w = _WORKER
    return w["method"].encode(rows, w["tokenizer"], w["cfg"], train=w["train"])


def _chunks(part: list[dict]) -> Iterator[list[dict]]:
    yield part[:CHUNK]  # an empty split still gets the encoder's stats
    for i in range(CHUNK, len(part), CHUNK):
        yield part[i : i + CHUNK]


def _encoded(part, method, tokenizer, cfg, train: bool, num_proc: int) -> Iterator[tuple[list[dict], dict]]:
    if num_proc <= 1 or len(part) <= CHUNK:
        _init(method, tokenizer, cfg, train)
        yield from map(_encode_chunk, _chunks(part))
        return
    ctx = mp.get_context("fork")  # workers inherit the tokenizer and method; nothing is pickled but rows
    with ctx.Pool(num_proc, initializer=_init, initargs=(method, tokenizer, cfg, train)) as pool:
        yield from pool.imap(_encode_chunk, _chunks(part))


def row_wise(method) -> bool:
    return getattr(method, "data_schema", None) == "sft"


def encode_split(
    name: str, part: list[dict], train: bool, cfg, method, tokenizer, folder: Path
) -> tuple[Rows, dict]:
    """The split's examples in folder/<name>.arrow (memory-mapped) and the encoder's stats."""
    path = folder / f"{name}.arrow"
    if not row_wise(method):
        examples, stats = method.encode(part, tokenizer, cfg, train=train)
        return Rows(path, write_rows(path, examples)), stats
    packing = train and cfg.data.packing
    run_cfg = cfg
    if packing:  # encode unpacked, pack on lengths below
        run_cfg = copy.deepcopy(cfg)
        run_cfg.data.packing = False
    stats: dict = {}
    lengths: list[int] = []
    writer = RowWriter(folder / f"{name}.unpacked.arrow" if packing else path)
    for examples, chunk_stats in _encoded(part, method, tokenizer, run_cfg, train, cfg.data.num_proc):
        writer.add(examples)
        lengths += [len(ex["input_ids"]) for ex in examples]
        for k, v in chunk_stats.items():
            stats[k] = max(stats.get(k, 0), v) if k.endswith("_max") else stats.get(k, 0) + v
    rows = writer.close()
    ordered = sorted(lengths) or [0]
    if "tokens_p50" in stats:
        stats["tokens_p50"] = ordered[len(ordered) // 2]
    if not packing:
        return rows, stats
    bins = pack_bins(lengths, cfg.data.max_length)
    packed = RowWriter(path)
    for start in range(0, len(bins), CHUNK):
        batch = []
        for b in bins[start : start + CHUNK]:
            seq = {"input_ids": [], "labels": [], "position_ids": []}
            for i in b:
                ex = rows[i]
                seq["input_ids"] += ex["input_ids"]
                seq["labels"] += ex["labels"]
                seq["position_ids"] += ex["position_ids"]
            batch.append(seq)
        packed.add(batch)
    out = packed.close()
    del rows
    (folder / f"{name}.unpacked.arrow").unlink()
    stats["packed_sequences"] = len(bins)
    return out, stats
