"""The shards of a streamed data set (data.streaming=true) and how a block of rows is read from one.

A shard is a range of one source: bytes of a JSONL file (a line belongs to the shard its first
byte is in), rows of a Parquet file, or rows of the method's embedded data. The plan depends on
the files' sizes and the number of lanes only (never on the number of ranks): files are cut into
ranges of at most SHARD_BYTES / SHARD_ROWS, then every range is cut again until there are at
least as many shards as lanes, in a multiple of the lanes, so every lane gets the same number.

Blocks are read from a position inside a shard (a byte offset at a line start, or a row index)
and return the position after them, so a reader resumes at a stored position without reading
what came before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from distft.data.sources import SUFFIXES, looks_like_hub_id, parse_line
from distft.errors import DataError

SHARD_BYTES = 64 << 20
SHARD_ROWS = 200_000
STREAM_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Shard:
    source: int
    """Index of the data.path entry (0 for embedded rows)."""
    path: str
    kind: str
    """jsonl (start/end are byte offsets), parquet or rows (row indices)."""
    start: int
    end: int

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "path": self.path,
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
        }


def stream_files(spec: str) -> list[Path]:
    """The JSONL/Parquet files of one data.path entry, or a DataError saying what streams."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in SUFFIXES)
    elif p.is_file():
        files = [p]
    elif looks_like_hub_id(spec):
        raise DataError(
            f"data.path {spec}: data.streaming=true reads local JSONL or Parquet files; download the hub "
            "dataset first (e.g. datasets' to_json(lines=True) or to_parquet) or set data.streaming=false"
        )
    else:
        raise DataError(f"data.path {spec}: no such file or directory ({p.resolve()})")
    other = [f for f in files if f.suffix not in STREAM_SUFFIXES]
    if other or not files:
        what = other[0].name if other else f"{spec} holds no .jsonl/.parquet files"
        raise DataError(
            f"data.path {spec}: data.streaming=true reads .jsonl and .parquet files only ({what}); "
            "convert it (e.g. datasets' to_json(lines=True)) or set data.streaming=false"
        )
    return files


def _ranges(start: int, end: int, pieces: int) -> list[tuple[int, int]]:
    cuts = [start + (end - start) * i // pieces for i in range(pieces + 1)]
    return list(zip(cuts, cuts[1:]))


def plan(paths: list[str], embedded_rows: int, lanes: int) -> list[Shard]:
    """Shards of data.path (or of `embedded_rows` embedded rows when data.path is empty)."""
    base: list[Shard] = []
    if not paths:
        base += [
            Shard(0, "", "rows", a, b) for a, b in _ranges(0, embedded_rows, -(-embedded_rows // SHARD_ROWS))
        ]
    for i, spec in enumerate(paths):
        for f in stream_files(spec):
            if f.suffix == ".jsonl":
                size = f.stat().st_size
                base += [
                    Shard(i, str(f), "jsonl", a, b)
                    for a, b in _ranges(0, size, max(1, -(-size // SHARD_BYTES)))
                ]
            else:
                import pyarrow.parquet as pq

                n = pq.ParquetFile(f).metadata.num_rows
                base += [
                    Shard(i, str(f), "parquet", a, b) for a, b in _ranges(0, n, max(1, -(-n // SHARD_ROWS)))
                ]
    base = [s for s in base if s.end > s.start]
    if not base:
        raise DataError(f"data.path {', '.join(paths) or '(embedded)'}: nothing to stream (empty files)")
    split = math.ceil(lanes / len(base))  # at least one shard per lane
    shards = [Shard(s.source, s.path, s.kind, a, b) for s in base for a, b in _ranges(s.start, s.end, split)]
    while len(shards) % lanes:  # every lane the same number of shards per epoch (empty ones allowed)
        shards.append(
            Shard(shards[-1].source, shards[-1].path, shards[-1].kind, shards[-1].end, shards[-1].end)
        )
    return shards


def begin(shard: Shard) -> int:
    """The first position of a shard: for JSONL the start of the first line that starts in it."""
    if shard.kind != "jsonl" or shard.start == 0:
        return shard.start
    with open(shard.path, "rb") as f:
        f.seek(shard.start - 1)
        f.readline()  # the rest of the line that began before the shard
        return f.tell()


class BlockReader:
    """Reads blocks of raw rows; keeps the open Parquet file (and its last row group) and the
    embedded rows."""

    def __init__(self, embedded: list[dict] | None, bad_lines: str):
        self.embedded = embedded or []
        self.bad_lines = bad_lines
        self._parquet: dict[str, object] = {}
        self._group: tuple[str, int, object] | None = None

    def read(self, shard: Shard, pos: int, limit: int, bad: list[dict]) -> tuple[list[dict], int]:
        """Up to `limit` rows from `pos` (malformed JSONL lines count toward the limit and go to
        `bad` with data.bad_lines=skip); returns them and the position after them."""
        if shard.kind == "rows":
            end = min(pos + limit, shard.end)
            return [dict(r, _src=0) for r in self.embedded[pos:end]], end
        if shard.kind == "parquet":
            return self._parquet_rows(shard, pos, min(pos + limit, shard.end)), min(pos + limit, shard.end)
        rows: list[dict] = []
        path = Path(shard.path)
        with open(path, "rb") as f:
            f.seek(pos)
            for _ in range(limit):
                if pos >= shard.end:
                    break
                raw = f.readline()
                if not raw:
                    break
                where = f"{path}@{pos}"
                row = parse_line(raw, path, 0, pos, where, bad if self.bad_lines == "skip" else None)
                pos += len(raw)
                if row is not None:
                    row["_src"] = shard.source
                    rows.append(row)
        return rows, pos

    def _parquet_rows(self, shard: Shard, a: int, b: int) -> list[dict]:
        import pyarrow.parquet as pq

        pf = self._parquet.get(shard.path)
        if pf is None:
            pf = self._parquet[shard.path] = pq.ParquetFile(shard.path)
        out: list[dict] = []
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(a, first), min(b, first + n)
            if lo < hi:
                if self._group is None or self._group[:2] != (shard.path, g):
                    self._group = (shard.path, g, pf.read_row_group(g))
                part = self._group[2].slice(lo - first, hi - lo).to_pylist()
                out += [
                    dict(r, _source=f"{shard.path}#{lo + k}", _src=shard.source) for k, r in enumerate(part)
                ]
            first += n
            if first >= b:
                break
        return out
