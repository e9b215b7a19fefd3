"""Read → map schemas → clean → split in batches, in bounded memory (issue 15 point 2).

Source rows are read one at a time and cut into batches of BATCH rows; data.num_proc forked
workers map and clean each batch row by row (schema mapping, normalization, PII masking, the
filters, token lengths and the overlong filter) and compute what the later steps need: 16-byte
digests of the exact-duplicate key, the prompt and the answer, hashes of the LSH bands of the
prompt's MinHash signature (8 bytes a band), the first word of the completion and the label.
The kept rows go to an Arrow file of pickled rows (`Store`) as batches come back, in order; the
main process keeps those small per-row arrays only. Exact dedup (first occurrence wins), near
dedup (on the band hashes; only candidate pairs' rows are read back and their signatures
computed again), the conflict count, the grouped split and the mix then work on them.

Every decision and every count of the data report is the one `clean` + `split_rows` make on the
whole list (tests/test_data_batched.py compares them on rows with duplicates, near duplicates,
malformed lines, personal data, too long and too short rows); errors come in the same order:
reading errors first, then the first row without a known schema, then chat rows without an
assistant turn.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from distft.data import clean as cl
from distft.data import near_dedup as nd
from distft.data import workers
from distft.data.cleaned import EXAMPLES_PER_REASON
from distft.data.report import first_word
from distft.data.rows import binary_array
from distft.data.schemas import (
    assistant_turns_error,
    prompt_and_answer,
    to_canonical,
    without_assistant_turn,
)
from distft.data.sft_format import SftTokens
from distft.data.sources import iter_path, mix_indices
from distft.data.split import split_indices
from distft.errors import DataError

BATCH = 2000
SCHEMA = pa.schema([("row", pa.large_binary()), ("tokens", pa.large_binary())])


# ---------------------------------------------------------------- the row store
class Store:
    """Kept rows in an Arrow IPC file (one pickled row a record, and the row's packed SftTokens
    where cleaning computed them, else empty), memory-mapped once written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self.table: pa.Table | None = None
        self._columns: dict[str, _Column] = {}

    def add(self, pickled: list[bytes], tokens: list[bytes] | None = None) -> None:
        if pickled:
            toks = binary_array(tokens or [b""] * len(pickled))
            self._writer.write_batch(pa.record_batch([binary_array(pickled), toks], schema=SCHEMA))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()

    def column(self, name: str) -> _Column:
        if name not in self._columns:
            self._columns[name] = _Column(self.table.column(name))
        return self._columns[name]

    def rows(self, indices) -> StoreRows:
        return StoreRows(self, np.asarray(indices, dtype=np.int64))


class _Column:
    """A binary column of the store, value g read in O(1): bytes [begin[g], end[g]) of its record
    batch's data buffer (memory-mapped), with no Arrow call per value."""

    def __init__(self, column: pa.ChunkedArray):
        self._views, chunk, begin, end = [], [], [], []
        for k, c in enumerate(column.chunks):
            offsets = np.frombuffer(c.buffers()[1], dtype=np.int64)[c.offset : c.offset + len(c) + 1]
            data = c.buffers()[2]
            self._views.append(memoryview(data if data is not None else b""))
            chunk.append(np.full(len(c), k, dtype=np.int32))
            begin.append(offsets[:-1])
            end.append(offsets[1:])
        self._chunk, self._begin, self._end = (
            np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (chunk, begin, end)
        )

    def values(self, indices: np.ndarray) -> list[memoryview]:
        views = self._views
        where = zip(self._chunk[indices].tolist(), self._begin[indices].tolist(), self._end[indices].tolist())
        return [views[k][a:b] for k, a, b in where]


def pack_tokens(t: SftTokens) -> bytes:
    """SftTokens in a few bytes: flags (ids of 8 bytes, EOS), the count, the ids (uint16 where they
    fit) and the targets as bits."""
    ids = t.ids
    narrow = not len(ids) or (int(ids.min()) >= 0 and int(ids.max()) < 1 << 16)
    head = bytes([(not narrow) | (t.add_eos << 1)]) + len(ids).to_bytes(4, "little")
    body = ids.astype(np.uint16 if narrow else np.int64).tobytes()
    return head + body + np.packbits(t.targets).tobytes()


def unpack_tokens(b) -> SftTokens | None:
    if not len(b):
        return None
    n, wide = int.from_bytes(b[1:5], "little"), b[0] & 1
    ids = np.frombuffer(b, np.int64 if wide else np.uint16, count=n, offset=5).astype(np.int64)
    bits = np.frombuffer(b, np.uint8, offset=5 + n * (8 if wide else 2))
    return SftTokens(ids, np.unpackbits(bits, count=n).astype(bool), bool(b[0] & 2))


class StoreRows(Sequence):
    """Rows of a Store by index: row k is decoded when it is asked for, read straight from the
    memory-mapped file (O(1) a row, whatever the order). `read(a, b)`: rows a..b and their
    SftTokens apart (what an encoding worker reads)."""

    def __init__(self, store: Store, indices: np.ndarray):
        self._store = store
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, start: int, end: int) -> tuple[list[dict], list[SftTokens | None]]:
        idx = self.indices[start:end]
        return self._rows(idx), list(map(unpack_tokens, self._store.column("tokens").values(idx)))

    def _rows(self, indices: np.ndarray) -> list[dict]:
        return list(map(pickle.loads, self._store.column("row").values(indices)))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self._rows(self.indices[k])
        return self._rows(self.indices[[k]])[0]

    def __iter__(self) -> Iterator[dict]:
        for i in range(0, len(self.indices), BATCH):
            yield from self._rows(self.indices[i : i + BATCH])


# ---------------------------------------------------------------- one batch (in a worker)
_W: dict = {}


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _mapped(raw: list[dict], res: cl.Cleaned) -> tuple[list[dict], int, dict, list[dict]]:
    """Step 1: source rows in the canonical schema (rows without content dropped as empty), how
    many were loaded, the formats found, and the chat rows without an assistant turn (an error
    for SFT)."""
    w, c = _W, _W["data"]
    mapped, empty, formats = to_canonical(raw, c.format, c.columns, w["kind"], w["name"], check_turns=False)
    for row in empty:
        res.drop("empty", row, "no content")
    no_turn = without_assistant_turn(mapped) if w["kind"] == "sft" else []
    return mapped, len(mapped) + len(empty), formats, no_turn


def _cleaned(rows: list[dict], res: cl.Cleaned) -> list[dict]:
    """Step 2: normalization, personal data, the filters (clean's first steps)."""
    c = _W["data"]
    rows = cl._normalize(rows, c, res)
    if c.pii_mask:
        rows = cl._mask_pii(rows, c, res)
    return cl._filter(rows, c, res)


def _measured(rows: list[dict], res: cl.Cleaned) -> tuple[list[dict], list[int], list[bytes]]:
    """Step 3: token lengths and the overlong filter; with a `tokens_of` (SFT) the rows' SftTokens
    come with the lengths, so the encoder does not tokenize the rows again."""
    w, c = _W, _W["data"]
    if w["tokens_of"] is not None:
        lengths, tokens = w["tokens_of"](rows)
    else:
        lengths, tokens = w["lengths_of"](rows), [None] * len(rows)
    if c.overlong == "drop" and w["max_tokens"]:
        tokens = [t for t, n in zip(tokens, lengths) if n <= w["max_tokens"]]  # as _drop_overlong keeps
        rows, lengths = cl._drop_overlong(rows, lengths, w["max_tokens"], res)
    return rows, lengths, [b"" if t is None else pack_tokens(t) for t in tokens]


def _features(rows: list[dict]) -> dict:
    """Step 4: what dedup, the conflict count, the split and the mix need of each kept row."""
    parts = [prompt_and_answer(r) for r in rows]
    near = _W["near"]
    return {
        "content": b"".join(_digest(cl.content_key(r)) for r in rows),
        "prompt": b"".join(_digest(p) for p, _ in parts),
        "answer": b"".join(_digest(a) for _, a in parts),
        "bands": nd.band_hashes(nd._signatures([p for p, _ in parts]), *near) if near else None,
        "labels": [str(r["label"]) if "label" in r and "text" in r else None for r in rows],
        "first_words": [first_word(r) for r in rows],
        "src": np.asarray([r.get("_src", 0) for r in rows], dtype=np.int64),
    }


def _clean_batch(raw: list[dict]) -> dict:
    """Map and clean one batch; per stage its drops, and per kept row its features."""
    res0, res1, res2 = (cl.Cleaned([], None, {}) for _ in range(3))
    mapped, loaded, formats, no_turn = _mapped(raw, res0)
    rows = _cleaned(mapped, res1)
    rows, lengths, tokens = _measured(rows, res2)
    return {
        "loaded": loaded,
        "formats": formats,
        "no_turn": (len(no_turn), no_turn[:5]),
        "drops": [res0.drops, res1.drops, res2.drops],
        "normalized": res1.normalized,
        "pii": res1.pii,
        "rows": [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in rows],
        "tokens": tokens,
        "lengths": np.asarray(lengths, dtype=np.int64),
        **_features(rows),
    }


def ordered(fn, items: Iterator, num_proc: int, init, initargs) -> Iterator:
    """Calls that give fn(item) for the items in order, computed in num_proc forked workers with
    at most 2 x num_proc batches in flight (reading waits for the workers, so memory holds a few
    batches, not the file). A single item runs here: no workers are forked for it."""
    if num_proc > 1:  # look ahead: workers only for two items or more
        items = iter(items)
        head = list(itertools.islice(items, 2))
        items = itertools.chain(head, items)
        num_proc = num_proc if len(head) == 2 else 1
    if num_proc <= 1:
        init(*initargs)
        for item in items:
            yield lambda item=item: fn(item)
        return
    with workers.forked_pool(num_proc, init, initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get
        while pending:
            yield pending.popleft().get


def _init(data_cfg, kind, name, lengths_of, max_tokens, near, tokens_of=None) -> None:
    _W.update(data=data_cfg, kind=kind, name=name, lengths_of=lengths_of, max_tokens=max_tokens, near=near)
    _W["tokens_of"] = tokens_of


# ---------------------------------------------------------------- the whole source
@dataclass
class Sources:
    """What was read: per source its spec, rows and malformed lines."""

    specs: list[str]
    rows: list[int] = field(default_factory=list)
    bad_lines: list[list[dict]] = field(default_factory=list)


def _read(
    specs: list[str], bad_lines: str, embedded: list[dict] | None, seen: Sources
) -> Iterator[list[dict]]:
    """Batches of source rows (tagged `_src`), read row by row."""
    batch: list[dict] = []
    for i, spec in enumerate(specs):
        bad: list[dict] = []
        seen.rows.append(0)
        seen.bad_lines.append(bad)
        rows = embedded if embedded is not None else iter_path(spec, bad if bad_lines == "skip" else None)
        for row in rows:
            row["_src"] = i
            seen.rows[i] += 1
            batch.append(row)
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _merge_drops(into: dict, drops: dict) -> None:
    for reason, d in drops.items():
        m = into.setdefault(reason, {"count": 0, "examples": []})
        m["count"] += d["count"]
        m["examples"] += d["examples"][: EXAMPLES_PER_REASON - len(m["examples"])]


def _first_occurrences(digests: np.ndarray) -> np.ndarray:
    """For each row (16-byte digest as two uint64), the index of the first row with its digest."""
    if not len(digests):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests keep row order
    d = digests[order]
    starts = np.r_[True, np.any(d[1:] != d[:-1], axis=1)]
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    return first


@dataclass
class Prepared:
    """What prepare_rows gives: the cleaning result (its rows a StoreRows), the split's parts as
    StoreRows, the sources read and the formats found."""

    cleaned: cl.Cleaned
    parts: dict[str, StoreRows]
    sources: Sources
    formats: dict[str, int]
    mixed: dict[int, int] | None = None


@dataclass
class Batches:
    """What the batches gave, merged in order: counts for the report and the per-row arrays."""

    stages: list[dict] = field(default_factory=lambda: [{}, {}, {}])
    formats: dict[str, int] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    loaded: int = 0
    normalized: int = 0
    no_turn: int = 0
    first_no_turn: list[dict] = field(default_factory=list)
    error: Exception | None = None
    cols: dict[str, list] = field(
        default_factory=lambda: {k: [] for k in ("lengths", "content", "prompt", "answer", "bands", "src")}
    )
    labels: list = field(default_factory=list)
    words: list = field(default_factory=list)

    def add(self, out: dict, store: Store) -> None:
        self.loaded += out["loaded"]
        for k, v in out["formats"].items():
            self.formats[k] = self.formats.get(k, 0) + v
        self.no_turn += out["no_turn"][0]
        self.first_no_turn += out["no_turn"][1][: 5 - len(self.first_no_turn)]
        for into, drops in zip(self.stages, out["drops"]):
            _merge_drops(into, drops)
        self.normalized += out["normalized"]
        for k, v in out["pii"].items():
            self.pii[k] = self.pii.get(k, 0) + v
        store.add(out["rows"], out["tokens"])
        for k in self.cols:
            self.cols[k].append(out[k])
        self.labels += out["labels"]
        self.words += out["first_words"]


def _clean_all(cfg, lengths_of, tokens_of, store: Store, kind, embedded, seen: Sources, near) -> Batches:
    """Every batch through `_clean_batch` (in data.num_proc workers), merged in order into the store."""
    d = cfg.data
    initargs = (d, kind, cfg.method.name, lengths_of, d.max_length, near, tokens_of)
    got = Batches()
    batches = _read(seen.specs, d.bad_lines, embedded, seen)
    for job in ordered(_clean_batch, batches, workers.count(d), _init, initargs):
        try:
            out = job()
        except DataError as e:  # the first schema error, raised once every source is read
            got.error = got.error or e
            continue
        if got.error is None:
            got.add(out, store)
    store.close()
    return got


def _raise_errors(cfg, got: Batches, seen: Sources, embedded) -> None:
    """In the old order: no rows at all, the first row of no known schema, chat rows without an
    assistant turn."""
    if not sum(seen.rows):
        bad = sum(len(b) for b in seen.bad_lines)
        extra = f" ({bad} malformed lines skipped)" if bad else ""
        where = (
            ", ".join(seen.specs)
            if embedded is None
            else f"the embedded default data of method={cfg.method.name}"
        )
        raise DataError(f"no rows in {where}{extra}; check data.path")
    if got.error is not None:
        raise got.error
    if got.no_turn:
        raise assistant_turns_error(got.no_turn, got.first_no_turn, cfg.method.name)


def _deduplicated(d, got: Batches, store: Store, digest: dict, near, res: cl.Cleaned) -> np.ndarray:
    """Indices of the rows kept by exact dedup (first occurrence wins), then near dedup."""
    keep = np.arange(store.table.num_rows)
    all_rows = store.rows(keep)
    if d.dedup:
        first = _first_occurrences(digest["content"])
        dup = first != keep
        for i in np.flatnonzero(dup)[:EXAMPLES_PER_REASON]:
            res.drop("exact_duplicate", all_rows[i], f"same as {all_rows[first[i]].get('_source', '?')}")
        if dup.any():
            res.drops["exact_duplicate"]["count"] = int(dup.sum())
        keep = keep[~dup]
    if near and len(keep) > 1:
        hashes = np.concatenate(got.cols["bands"])[keep]
        kept = nd.near_duplicates(store.rows(keep), d.near_dedup_threshold, res, hashes=hashes)
        keep = keep[np.asarray(kept, dtype=np.int64)]
    return keep


def _kept(got: Batches, store: Store, digest: dict, keep: np.ndarray, res: cl.Cleaned) -> None:
    """The kept rows, their lengths, labels and first words, the conflicts and the counts in `res`."""
    n = store.table.num_rows
    lengths = np.concatenate(got.cols["lengths"]) if n else np.zeros(0, dtype=np.int64)
    if len(keep):  # prompts with more than one distinct answer
        pairs = np.unique(np.concatenate([digest["prompt"][keep], digest["answer"][keep]], axis=1), axis=0)
        res.conflicts = int((np.unique(pairs[:, :2], axis=0, return_counts=True)[1] > 1).sum())
    res.rows, res.lengths = store.rows(keep), lengths[keep].tolist()
    res.first_words = [got.words[i] for i in keep]
    kept_labels = [got.labels[i] for i in keep]
    res.labels = kept_labels if kept_labels and all(x is not None for x in kept_labels) else None
    for reason in ("empty", "too_short", "too_long", "filtered", "exact_duplicate", "near_duplicate"):
        res.counts[reason] = res.drops.get(reason, {}).get("count", 0)
    res.counts["duplicates_removed"] = res.counts["exact_duplicate"] + res.counts["near_duplicate"]
    res.counts["kept"] = len(keep)


def _split(cfg, got: Batches, store: Store, digest: dict, keep: np.ndarray, prepared: Prepared) -> None:
    """The grouped (and stratified) split of the kept rows, then the mix of the train split."""
    d, res = cfg.data, prepared.cleaned
    keys = [bytes(k) for k in digest["prompt"][keep]]  # equal exactly when the prompts are
    strat = res.labels if d.stratify else None
    parts = split_indices(keys, strat, d.splits, cfg.train.seed, res.rows.__getitem__)
    train = parts[0]
    if d.weights:
        srcs = np.concatenate(got.cols["src"])[keep]
        picked, prepared.mixed = mix_indices(
            srcs[np.asarray(train, dtype=np.int64)].tolist(), d.weights, cfg.train.seed
        )
        train = [train[i] for i in picked]
    for name, idx in zip(("train", "val", "test"), (train, parts[1], parts[2])):
        prepared.parts[name] = store.rows(keep[np.asarray(idx, dtype=np.int64)])


def prepare_rows(
    cfg, method, lengths_of, store: Store, kind: str | None, embedded=None, tokens_of=None
) -> Prepared:
    """Read, map, clean and split data.path (or the `embedded` rows) in batches. `tokens_of(rows)`
    (optional) gives the rows' lengths and SftTokens (or None) at once, kept in the store."""
    d = cfg.data
    specs = list(d.path) if embedded is None else [f"<embedded {cfg.method.name} data>"]
    seen = Sources(specs)
    near = nd.lsh_params(d.near_dedup_threshold) if d.near_dedup and d.near_dedup_threshold > 0 else None
    got = _clean_all(cfg, lengths_of, tokens_of, store, kind, embedded, seen, near)
    _raise_errors(cfg, got, seen, embedded)
    digest = {
        k: np.frombuffer(b"".join(got.cols[k]), dtype="<u8").reshape(-1, 2)
        for k in ("content", "prompt", "answer")
    }
    res = cl.Cleaned([], None, {"loaded": got.loaded})
    res.normalized, res.pii = got.normalized, got.pii if d.pii_mask else {}
    for drops in got.stages:
        _merge_drops(res.drops, drops)
    keep = _deduplicated(d, got, store, digest, near, res)
    _kept(got, store, digest, keep, res)
    prepared = Prepared(res, {}, seen, got.formats)
    if len(keep):
        _split(cfg, got, store, digest, keep, prepared)
    return prepared
