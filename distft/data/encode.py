"""Encode a split into an Arrow file in bounded memory, with data.num_proc worker processes.

Row-wise encoders (SFT, preference pairs, RL prompts, classification: `chunked`) run over
chunks of CHUNK rows, in forked workers when data.num_proc > 1, and each chunk is written as soon
as it is done, so the token lists of the split never exist at once. Packing then works on the
lengths alone (`pack_bins`) and assembles sequences from the memory-mapped unpacked file. The
result is the same as one `method.encode` call on the whole split (tests check it), whatever
num_proc is. Skip limits (method.max_skip_fraction) are checked once on the whole split, from
the chunks' merged counts. KTO, whose examples are paired across the split (KL partners), is
encoded in chunks too (`method.encode_chunk` with each chunk's start row), then linked by
`method.link_split` reading the memory-mapped chunks. Other methods are encoded in one call.

The main process only writes: a worker reads its chunk of a row-store split itself (bounds, not
rows, are sent), encodes it to Arrow tables (SFT rows that carry their tokens straight from numpy,
distft/data/sft_arrow.py) and renders the split's row copies (`RowCopies`: data/<split>.jsonl and
the val/test rows), so nothing of a chunk but its tables and texts crosses processes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from distft.data import workers
from distft.data.collate import pack_bins
from distft.data.preference import Skips
from distft.data.rows import BATCH, Rows, RowWriter, json_table, narrowest, write_rows
from distft.data.schemas import length_text
from distft.data.sft_format import PRETOKENIZED, SftTokens, encode_texts, render, sft_tokens
from distft.errors import DataError

CHUNK = 2000  # a multiple of rows.BATCH: a chunk's tables are the batches one writer of the split cuts
_WORKER: dict = {}


def _init(method, tokenizer, cfg, train: bool, part=None, copies: bool = False, jsons: bool = False) -> None:
    _WORKER.update(method=method, tokenizer=tokenizer, cfg=cfg, train=train, part=part)
    _WORKER.update(copies=copies, jsons=jsons)


def copy_texts(rows: list[dict], jsons: bool) -> tuple[bytes, list[str] | None]:
    """The rows as data/<name>.jsonl lines (without `_src`) and, with `jsons`, as the json
    encoding's texts (`rows.json_table`)."""
    lines = "".join(json.dumps({k: v for k, v in r.items() if k != "_src"}, default=str) + "\n" for r in rows)
    return lines.encode("utf-8"), [json.dumps(r, default=str) for r in rows] if jsons else None


def _encode_chunk(chunk: tuple[int, int, list[dict] | None]):
    """One chunk's (encoding, table) batches, example lengths, stats and row copies. A chunk of a
    StoreRows split comes as its bounds and is read here (in the worker, from the memory-mapped
    store), so rows are never pickled; SFT rows with their tokens take `sft_tables`."""
    w, (start, end, rows) = _WORKER, chunk
    method, tokenizer, cfg = w["method"], w["tokenizer"], w["cfg"]
    tokens: list = []
    if rows is None:
        rows, tokens = w["part"].read(start, end)
    copied = copy_texts(rows, w["jsons"]) if w["copies"] else None
    out = None
    if getattr(method, "encodes_sft_tokens", False) and tokens and all(t is not None for t in tokens):
        from distft.data.sft_arrow import sft_tables
        from distft.data.vision import refuse_images

        refuse_images(rows, cfg.model.name_or_path)  # as SFT.encode does first
        out = sft_tables(tokens, tokenizer.eos_token_id, cfg.data.max_length, cfg.method.train_on_prompt)
    if out is None:
        for row, t in zip(rows, tokens):
            if t is not None:
                row[PRETOKENIZED] = t
        if hasattr(method, "encode_chunk"):  # examples that refer to their row's place in the split
            examples, stats = method.encode_chunk(rows, tokenizer, cfg, w["train"], start)
        else:
            examples, stats = method.encode(rows, tokenizer, cfg, train=w["train"])
        tables = [narrowest(examples[i : i + BATCH]) for i in range(0, len(examples), BATCH)]
        lengths = np.fromiter((len(ex["input_ids"]) for ex in examples if "input_ids" in ex), dtype=np.int64)
        out = tables, lengths, stats
    return (*out, copied)


def _chunks(part: Sequence[dict]) -> Iterator[tuple[int, int, list[dict] | None]]:
    """(start, end, rows) of each chunk; rows None where the worker reads them (StoreRows)."""
    reads = hasattr(part, "read")
    for i in range(0, max(len(part), 1), CHUNK):  # an empty split still gets the encoder's stats
        end = min(i + CHUNK, len(part))
        yield i, end, None if reads else list(part[i:end])


def _encoded(part, method, tokenizer, cfg, train: bool, num_proc: int, copies) -> Iterator[tuple]:
    """Each chunk's `_encode_chunk` in order; workers inherit the tokenizer, method and split
    (fork), and only a few chunks are read ahead of the writer."""
    from distft.data.batched import ordered

    n = num_proc if len(part) > CHUNK else 1
    initargs = (method, tokenizer, cfg, train, part, copies is not None, bool(copies and copies.jsons))
    for job in ordered(_encode_chunk, _chunks(part), n, _init, initargs):
        yield job()
    _WORKER.clear()  # with num_proc=1 this process was the worker: let the split go


class RowCopies:
    """A split's rows written while it is encoded, in two more forms: `jsonl` (data/<name>.jsonl,
    the run dir's inspectable copy) and, when `rows` is given, an Arrow file of the rows in the json
    encoding (val/test rows for generation), cut in rows.BATCH rows as `write_rows` cuts them.
    The workers render the texts (`copy_texts`); this process only writes them."""

    def __init__(self, jsonl: Path, rows: Path | None = None):
        self.jsonl, self.rows, self.jsons = jsonl, rows, rows is not None
        self._file, self._writer, self._pending = None, None, []

    def open(self) -> None:
        self.close()
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.jsonl, "wb")
        self._writer = RowWriter(self.rows, "json") if self.rows is not None else None
        self._pending = []

    def add(self, copied: tuple[bytes, list[str] | None]) -> None:
        lines, texts = copied
        self._file.write(lines)
        if self._writer is not None:
            self._pending += texts
            while len(self._pending) >= BATCH:
                self._writer.add_table("json", json_table(self._pending[:BATCH]))
                del self._pending[:BATCH]

    def write(self, part: Sequence[dict]) -> None:
        """All of them, in this process (a split encoded in one call)."""
        self.open()
        for i in range(0, len(part), CHUNK):
            self.add(copy_texts(list(part[i : i + CHUNK]), self.jsons))
        self.close()

    def close(self) -> None:
        """Flush both files (the rows file is always in the json encoding)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._writer is None:
            return
        if self._pending:
            self._writer.add_table("json", json_table(self._pending))
        self._writer.close()
        self._writer = None


def row_wise(method) -> bool:
    return getattr(method, "data_schema", None) == "sft"


def chunked(method) -> bool:
    """Encoders whose rows encode alone (SFT, preference pairs, RL prompts, classification): the
    split's encoding is the concatenation of its chunks'. KTO pairs every example with another
    of the split (its KL rows): its chunks are linked afterwards (`link_split`)."""
    return row_wise(method) or bool(getattr(method, "encode_chunks", False)) or hasattr(method, "link_split")


def _merge(stats: dict, chunk: dict) -> None:
    """Chunk stats into split stats: *_max by max, counts and per-reason dicts summed, lists joined."""
    for k, v in chunk.items():
        if isinstance(v, dict):
            _merge(stats.setdefault(k, {}), v)
        elif isinstance(v, list):
            stats[k] = stats.get(k, []) + v
        else:
            stats[k] = max(stats.get(k, 0), v) if k.endswith("_max") else stats.get(k, 0) + v


def _chunk_cfg(cfg, packing: bool):
    """The config the chunks are encoded with: no packing (packed below on the lengths), and
    skips checked on the whole split rather than per chunk."""
    skip_check = hasattr(cfg.method, "max_skip_fraction")
    if not (packing or skip_check):
        return cfg
    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.packing = False
    if skip_check:
        run_cfg.method.max_skip_fraction = math.inf
    return run_cfg


def encode_split(
    name: str,
    part: Sequence[dict],
    train: bool,
    cfg,
    method,
    tokenizer,
    folder: Path,
    copies: RowCopies | None = None,
) -> tuple[Rows, dict]:
    """The split's examples in folder/<name>.arrow (memory-mapped) and the encoder's stats; with
    `copies`, the split's rows are written there too (by the same workers)."""
    path = folder / f"{name}.arrow"
    if not chunked(method):
        return _encode_whole(part, path, train, cfg, method, tokenizer, copies)
    packing = train and cfg.data.packing and row_wise(method)
    linked = hasattr(method, "link_split")
    run_cfg = _chunk_cfg(cfg, packing)
    stats: dict = {}
    lengths: list[np.ndarray] = []
    first = folder / f"{name}.{'unpacked' if packing else 'unlinked'}.arrow"
    writer = RowWriter(first if packing or linked else path)
    if copies is not None:
        copies.open()
    try:
        for tables, chunk_lengths, chunk_stats, copied in _encoded(
            part, method, tokenizer, run_cfg, train, workers.count(cfg.data), copies
        ):
            for encoding, table in tables:
                writer.add_table(encoding, table)
            lengths.append(chunk_lengths)
            _merge(stats, chunk_stats)
            if copies is not None:
                copies.add(copied)
    except DataError:
        if row_wise(method):
            raise
        # A check of one chunk (e.g. RL's "every prompt is too long") may not hold for the whole
        # split: encode it in one call, which raises only when the split fails it.
        writer.close()
        return _encode_whole(part, path, train, cfg, method, tokenizer, copies)
    if copies is not None:
        copies.close()
    if "skipped_first" in stats:
        what = getattr(method, "skip_what", "preference")
        Skips.of_split(stats, cfg.method.max_skip_fraction, what).check(len(part))
    rows = writer.close()
    if linked:
        out = RowWriter(path)
        for batch in method.link_split(rows, cfg):
            out.add(batch)
        del rows
        first.unlink()
        return out.close(), stats
    all_lengths = np.concatenate(lengths).tolist() if lengths else []
    ordered = sorted(all_lengths) or [0]
    if "tokens_p50" in stats:
        stats["tokens_p50"] = ordered[len(ordered) // 2]
    if not packing:
        return rows, stats
    out, stats["packed_sequences"] = _packed(rows, all_lengths, path, cfg.data.max_length)
    del rows
    first.unlink()
    return out, stats


def _encode_whole(part, path: Path, train: bool, cfg, method, tokenizer, copies) -> tuple[Rows, dict]:
    """The split encoded in one call (a method that is not chunked, or a chunk's check that the
    whole split may still pass), its copies written in this process."""
    if copies is not None:
        copies.write(part)
    examples, stats = method.encode(list(part), tokenizer, cfg, train=train)
    return Rows(path, write_rows(path, examples)), stats


def _packed(rows: Rows, lengths: list[int], path: Path, max_length: int) -> tuple[Rows, int]:
    """The examples bin-packed (`pack_bins`) into path, a chunk of bins at a time; and the count."""
    bins = pack_bins(lengths, max_length)
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
    return packed.close(), len(bins)


def token_lengths(tokenizer, chunk: int = 10_000):
    def lengths(rows: list[dict]) -> list[int]:
        eos = tokenizer.eos_token_id is not None
        out: list[int] = []
        for i in range(0, len(rows), chunk):  # token lists of one chunk at a time
            part = rows[i : i + chunk]
            ids, _ = encode_texts(tokenizer, [length_text(r, tokenizer) for r in part], offsets=False)
            # prompt/completion rows get an EOS appended by the SFT encoder
            out += [len(x) + (eos and "completion" in r) for x, r in zip(ids, part)]
        return out

    return lengths


def sft_lengths_and_tokens(tokenizer, chunk: int = 10_000):
    """`tokens_of` for SFT (distft/data/batched.py): each row's token length as `token_lengths`
    gives it, and its SftTokens (what the SFT encoder tokenizes), from one tokenization. A row
    whose rendered text is not its length text (images, no chat template, ...) gets its length
    from `token_lengths` and no tokens (the encoder tokenizes it, or reports it)."""
    lengths_of = token_lengths(tokenizer, chunk)
    eos = tokenizer.eos_token_id is not None

    def of(rows: list[dict]) -> tuple[list[int], list[SftTokens | None]]:
        same = []
        for k, row in enumerate(rows):
            try:
                text, _, add_eos = render(row, tokenizer)
            except DataError:
                continue
            if text == length_text(row, tokenizer) and (not eos or add_eos == ("completion" in row)):
                same.append(k)
        tokens: list[SftTokens | None] = [None] * len(rows)
        for i in range(0, len(same), chunk):  # token lists of one chunk at a time
            for k, t in zip(
                same[i : i + chunk], sft_tokens([rows[k] for k in same[i : i + chunk]], tokenizer)
            ):
                tokens[k] = t
        other = [k for k, t in enumerate(tokens) if t is None]
        lengths = [0 if t is None else len(t.ids) + (eos and t.add_eos) for t in tokens]
        for k, n in zip(other, lengths_of([rows[k] for k in other])):
            lengths[k] = n
        return lengths, tokens

    return of
