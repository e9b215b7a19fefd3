"""Prepared rows in Arrow files (IPC streams), memory-mapped by every rank.

A split is written once by the preparing rank and read by all: row i is decoded only when it is
asked for, so a rank's memory holds the rows of its current batches, not the split.

Three encodings:
  tokens  examples of the form {input_ids, labels, position_ids} (SFT, packed or not): input_ids
          as int32, the labels as one bit per token (a target equals its input id, the rest are
          -100) and position_ids as the offsets where a packed segment starts (positions restart
          at 0 there). About 4 bytes a token instead of the 3 × 8 of three int64 lists.
  tokens16  the same with uint16 input_ids, while every id is below 65,536 (vocabularies up to
          64k: Llama-2, Mistral, GPT-2, Phi-3): about 2 bytes a token.
  json    anything else (preference pairs, canonical rows with chat messages): one JSON text per
          row, decoded exactly as the rows were written (the cache kept JSON before).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from distft.data.sft_format import IGNORE

TOKEN_KEYS = ("input_ids", "labels", "position_ids")
BATCH = 1000
TOKENS_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("targets", pa.list_(pa.bool_())),
        ("starts", pa.list_(pa.int32())),
    ]
)
JSON_SCHEMA = pa.schema([("json", pa.large_string())])
TOKENS16_SCHEMA = TOKENS_SCHEMA.set(0, pa.field("input_ids", pa.list_(pa.uint16())))
SCHEMAS = {"tokens16": TOKENS16_SCHEMA, "tokens": TOKENS_SCHEMA, "json": JSON_SCHEMA}
ENCODINGS = tuple(SCHEMAS)  # narrowest first: a file widens to the next when a batch does not fit
TOKEN_ENCODINGS = ("tokens16", "tokens")


def token_table(rows: list[dict], encoding: str = "tokens") -> pa.Table | None:
    """The tokens (or tokens16) encoding of a batch, or None when a row does not fit it exactly."""
    if not all(isinstance(r, dict) and tuple(r) == TOKEN_KEYS for r in rows):
        return None
    (offsets, i), (lab_off, lab), (pos_off, p) = (int_lists([r[k] for r in rows]) for k in TOKEN_KEYS)
    if not (np.array_equal(offsets, lab_off) and np.array_equal(offsets, pos_off)):
        return None
    if not _fits(i, encoding):
        return None
    targets = lab == i
    if not np.all(targets | (lab == IGNORE)):
        return None
    row_of = np.repeat(np.arange(len(rows)), np.diff(offsets))
    first = np.zeros(len(p), dtype=bool)
    first[offsets[:-1][np.diff(offsets) > 0]] = True
    prev_ok = np.ones(len(p), dtype=bool)
    prev_ok[1:] = p[1:] == p[:-1] + 1
    restart = p == 0
    if not np.all(restart | (prev_ok & ~first)):  # positions run 0, 1, 2, ... from each start
        return None
    starts_flat = np.nonzero(restart)[0]
    starts_row = row_of[starts_flat]
    starts_off = np.searchsorted(starts_row, np.arange(len(rows) + 1))
    local = starts_flat - offsets[:-1][starts_row]
    return _token_arrays(offsets, i, targets, starts_off, local, encoding)


def _fits(ids: np.ndarray, encoding: str) -> bool:
    id_type = np.uint16 if encoding == "tokens16" else np.int32
    return not len(ids) or (ids.min() >= np.iinfo(id_type).min and ids.max() <= np.iinfo(id_type).max)


def _token_arrays(offsets, ids, targets, starts_off, starts_local, encoding: str) -> pa.Table:
    """The table of the token encodings from flat arrays: row offsets, ids, target flags, and per
    row the offsets into the flat local starts of its position runs."""
    id_type = np.uint16 if encoding == "tokens16" else np.int32
    row_offsets = numpy_array(offsets.astype(np.int32))
    columns = [
        pa.ListArray.from_arrays(row_offsets, numpy_array(ids.astype(id_type))),
        pa.ListArray.from_arrays(row_offsets, numpy_array(targets)),
        pa.ListArray.from_arrays(
            numpy_array(starts_off.astype(np.int32)), numpy_array(starts_local.astype(np.int32))
        ),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMAS[encoding])


def unpacked_token_table(offsets: np.ndarray, ids: np.ndarray, targets: np.ndarray) -> tuple | None:
    """The narrowest token encoding of unpacked, non-empty examples given as flat arrays (row
    offsets, int64 ids, target flags; positions 0, 1, 2, ... in each row): the table `token_table`
    makes of the same rows as lists (`narrowest`'s choice, without the lists); None beyond int32."""
    n = len(offsets) - 1
    encoding = "tokens16" if _fits(ids, "tokens16") else "tokens"
    if not _fits(ids, encoding):
        return None
    zeros = np.zeros(n, dtype=np.int64)
    return encoding, _token_arrays(offsets, ids, targets, np.arange(n + 1), zeros, encoding)


def encoded(rows: list[dict], encoding: str) -> pa.Table | None:
    """A batch in `encoding` (json always fits; the token encodings may not: None)."""
    return _json_batch(rows) if encoding == "json" else token_table(rows, encoding)


def narrowest(rows: list[dict], start: str | None = None) -> tuple[str, pa.Table]:
    """A batch in the narrowest encoding it fits, from `start` on (the widest so far)."""
    for encoding in ENCODINGS[ENCODINGS.index(start or ENCODINGS[0]) :]:
        table = encoded(rows, encoding)
        if table is not None:
            return encoding, table
    raise AssertionError("json fits every row")


def json_table(texts: list[str]) -> pa.Table:
    """The json encoding of rows already dumped (`json.dumps(row, default=str)`)."""
    column = binary_array([t.encode() for t in texts], pa.large_string())
    return pa.Table.from_arrays([column], schema=JSON_SCHEMA)


# pa.array() and pa.table() import pandas, to ask whether their input is a pandas object: ~0.25 s
# of the preparing rank's start. Arrays built from buffers skip that question.
def numpy_array(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array of numbers or bools as an Arrow array."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:  # Arrow packs bools in bits
        return pa.Array.from_buffers(
            pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))]
        )
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def binary_array(items: Sequence[bytes], type: pa.DataType = pa.large_binary()) -> pa.Array:
    """A large_binary (or large_string, of UTF-8 items) array of the items."""
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in items], out=offsets[1:])
    data = pa.py_buffer(b"".join(items))
    return pa.Array.from_buffers(type, len(items), [None, pa.py_buffer(offsets), data])


def int_lists(lists: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets, flat int64 values) of lists of integers."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat


def _json_batch(rows: list[dict]) -> pa.Table:
    return json_table([json.dumps(r, default=str) for r in rows])


def decode_table(table: pa.Table, encoding: str) -> list[dict]:
    """The rows of a table in one of the encodings (`Rows` reads its file row by row so)."""
    return [_decode_row(row, encoding) for row in table.to_pylist()]


def _decode_row(row: dict, encoding: str) -> dict:
    if encoding == "json":
        return json.loads(row["json"])
    ids, targets, starts = row["input_ids"], row["targets"], row["starts"]
    labels = [t if keep else IGNORE for t, keep in zip(ids, targets)]
    bounds = [*starts, len(ids)]
    position_ids = [j for a, b in zip(bounds, bounds[1:]) for j in range(b - a)]
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


class RowWriter:
    """Write rows batch by batch in the narrowest encoding every batch so far fits (tokens16, then
    tokens, then json); from the first batch that does not fit, the whole file is rewritten in the
    next encoding that does. `add_table` takes a batch a worker has already encoded (`narrowest`)."""

    def __init__(self, path: Path, encoding: str | None = None):
        self.path, self.encoding, self._writer, self.count = Path(path), encoding, None, 0

    def _open(self, encoding: str) -> None:
        self.encoding = encoding
        self._writer = _StreamWriter(self.path, SCHEMAS[encoding])

    def add(self, rows: list[dict]) -> None:
        for i in range(0, len(rows), BATCH):
            self._write(*narrowest(rows[i : i + BATCH], self.encoding))

    def add_table(self, encoding: str, table: pa.Table) -> None:
        """One batch (of at most BATCH rows) in the narrowest encoding it fits: written as `add`
        writes its rows (in the file's encoding when that is wider)."""
        if self.encoding is not None and ENCODINGS.index(encoding) < ENCODINGS.index(self.encoding):
            encoding, table = self.encoding, encoded(decode_table(table, encoding), self.encoding)
        self._write(encoding, table)

    def _write(self, encoding: str, table: pa.Table) -> None:
        if self._writer is None:
            self._open(encoding)
        elif encoding != self.encoding:  # wider: rewrite what is written in it
            self._writer.finalize()
            old = Rows(self.path, self.encoding).pin()
            self._open(encoding)
            for k in range(0, len(old), BATCH):
                self._writer.write_table(encoded(old[k : k + BATCH], encoding))
        self._writer.write_table(table)
        self.count += table.num_rows

    def close(self) -> Rows:
        if self._writer is None:
            self._open(self.encoding or "json")
            self._writer.write_table(pa.Table.from_batches([], schema=SCHEMAS[self.encoding]))
        self._writer.finalize()
        return Rows(self.path, self.encoding)


class _StreamWriter:
    """An Arrow IPC stream file written in record batches of at most BATCH rows (the layout
    `datasets`' ArrowWriter wrote: caches from before read the same). pyarrow directly: importing
    `datasets` (and the pandas it imports) cost every rank ~0.4 s before its first step."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._schema, self._sink = schema, pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def write_table(self, table: pa.Table) -> None:
        if not table.schema.equals(self._schema):  # e.g. a field's nullability
            table = table.cast(self._schema)
        self._writer.write_table(table.combine_chunks(), max_chunksize=BATCH)

    def finalize(self) -> None:
        self._writer.close()
        self._sink.close()


def read_table(path: Path) -> pa.Table:
    """A rows file as a table whose buffers are the memory-mapped file (nothing is read yet)."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def write_rows(path: Path, rows: Iterable[dict], encoding: str | None = None) -> str:
    """Write rows to an Arrow file; returns the encoding used (the narrowest every row fits, from
    `encoding` on: "json" forces json)."""
    writer = RowWriter(path, encoding)
    writer.add(rows if isinstance(rows, Sequence) else list(rows))  # a Sequence is read in batches
    return writer.close().encoding


class Rows(Sequence):
    """A read-only, memory-mapped split: `rows[i]` is a fresh dict, `rows[a:b]` a list of them.

    Concatenating (`rows + other`) turns the split into Python objects for good, so code that
    annotates every example in place (reference log-probs precomputed once) keeps working."""

    def __init__(self, path: Path, encoding: str, limit: int | None = None, _table=None):
        self.path, self.encoding = Path(path), encoding
        self._table = _table if _table is not None else read_table(path)
        n = self._table.num_rows
        self._len = n if limit is None else min(n, limit)
        self._pinned: list[dict] | None = None

    def head(self, n: int) -> Rows:
        """The first n rows (a view over the same file)."""
        out = Rows(self.path, self.encoding, min(n, self._len), self._table)
        if self._pinned is not None:
            out._pinned = self._pinned[: out._len]
        return out

    def __len__(self) -> int:
        return self._len

    def _decode(self, i: int) -> dict:
        return _decode_row(self._table.slice(i, 1).to_pylist()[0], self.encoding)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        if self._pinned is not None:
            return self._pinned[i]
        return self._decode(i)

    def __iter__(self) -> Iterator[dict]:
        for i in range(self._len):
            yield self[i]

    def pin(self) -> list[dict]:
        """Decode every row once and keep them (the same dict objects from now on)."""
        if self._pinned is None:
            self._pinned = [self._decode(i) for i in range(self._len)]
        return self._pinned

    def __add__(self, other) -> list:
        return self.pin() + (other.pin() if isinstance(other, Rows) else list(other))

    def __radd__(self, other) -> list:
        return list(other) + self.pin()

    def __eq__(self, other) -> bool:
        same_len = isinstance(other, Sequence) and len(self) == len(other)
        return same_len and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def lengths(self) -> np.ndarray:
        """Tokens per row from the Arrow offsets (no row decoded); zeros for json rows."""
        if self.encoding not in TOKEN_ENCODINGS:
            return np.zeros(self._len, dtype=np.int64)
        col = self._table.column("input_ids").combine_chunks()  # int32 offsets: `to_numpy` imports pandas
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
        return np.diff(offsets)[: self._len].astype(np.int64)
