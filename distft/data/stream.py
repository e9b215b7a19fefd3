"""Streamed data (data.streaming=true): rows are read, cleaned and tokenized while training runs,
so the data set may be larger than memory or disk.

The train stream is cut into `lanes`, one per example of the global batch (lane j gives example j
of every global batch); rank r of W reads only lanes [r L/W, (r+1) L/W), i.e. its contiguous
share, so the global batches never depend on the number of ranks. Each lane reads its shards
(distft/data/stream_shards.py; a seeded permutation per epoch deals the shards to the lanes) in
blocks of `data.stream_buffer / L` rows. A block goes through the batch pipeline's own functions
(schema mapping, `clean`, the method's `encode`) and is shuffled by a seed of (train.seed, epoch,
shard, position); a lane's state is (epoch, shard, block position, examples taken), so a resume
re-reads one block per lane, never what came before (distft/data/stream_sampler.py).

What holds in streaming, compared with the prepared (in-memory) pipeline:
  - exact and near dedup run within a block (a bounded window), not across the data set;
  - the 8:1:1 split hashes each row's prompt with the seed: rows that share a prompt land in one
    split without a global pass (no label stratification);
  - val/test are the first data.max_eval_examples (STREAM_EVAL if 0) rows of their split in
    file order, found by a scan at the start; the data report counts the rows that scan read;
  - packing packs within a block; data.weights, data.replay_path and methods other than SFT
    are refused (validation says so before any rank starts).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from distft.data import report as data_report
from distft.data.clean import Cleaned, clean
from distft.data.rows import Rows, token_table
from distft.data.schemas import method_kind, prompt_and_answer, to_canonical
from distft.data.stream_shards import BlockReader, Shard, begin, plan
from distft.errors import ConfigError, DataError

STREAM_EVAL = 1000  # val/test rows found by the start-up scan when data.max_eval_examples is 0
SCAN_BLOCK = 1024  # rows a block of the start-up scan
SAMPLE = 64  # train examples kept from the scan (mean length for MFU, a probe batch)
SPLITS = ("train", "val", "test")


def check_config(cfg, method_cls) -> None:
    """data.streaming's rules (called by distft.config.load.validate)."""
    d = cfg.data
    if not d.streaming:
        return
    if getattr(method_cls, "data_schema", None) != "sft":
        raise ConfigError(
            f"data.streaming=true is for method=sft (method={cfg.method.name} prepares its data as a whole); "
            "set data.streaming=false"
        )
    if not cfg.train.max_steps:
        raise ConfigError(
            "data.streaming=true needs train.max_steps (a stream's length is not known in advance), "
            "e.g. train.max_steps=1000"
        )
    if d.weights or getattr(d, "replay_path", []):
        key = "data.weights" if d.weights else "data.replay_path"
        raise ConfigError(f"{key} is not supported with data.streaming=true; set data.streaming=false")
    if cfg.data.group_by_length:
        raise ConfigError("data.group_by_length needs the whole split; it is off with data.streaming=true")


def split_of(row: dict, seed: int, ratios: list[float]) -> str:
    """train/val/test by a seeded hash of the row's prompt (rows sharing a prompt stay together)."""
    digest = hashlib.sha256(f"{seed}\0{prompt_and_answer(row)[0]}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * sum(ratios)
    return "train" if u < ratios[0] else "val" if u < ratios[0] + ratios[1] else "test"


def compact(examples: list[dict]):
    """A block's examples in the Arrow tokens encoding (~4 bytes a token instead of three Python
    int lists), decoded one at a time; as they are when they do not fit it."""
    table = token_table(examples) if examples else None
    return examples if table is None else Rows(Path("<stream block>"), "tokens", _table=table)


@dataclass
class Block:
    """One block of raw rows after the pipeline: train examples (shuffled), held-out rows."""

    train: Sequence[dict]
    held_out: dict[str, list[dict]]
    cleaned: Cleaned
    bad: list[dict]
    formats: dict[str, int]
    end: int
    """Position after the block in its shard."""


@dataclass
class Stream:
    """The shards and the per-block pipeline; shared by the start-up scan and the lanes."""

    cfg: object
    method: object
    tokenizer: object
    shards: list[Shard]
    lanes: int
    block_rows: int
    reader: BlockReader
    kind: str | None = None

    @classmethod
    def open(cls, cfg, method, tokenizer, lanes: int, block: int | None = None) -> Stream:
        d = cfg.data
        embedded = None
        if not d.path:
            embedded = method.default_rows(cfg)
        shards = plan(list(d.path), len(embedded or []), lanes)
        block = block or max(1, -(-d.stream_buffer // lanes))
        declared = getattr(method, "data_schema", None)
        kind = declared if isinstance(declared, str) else method_kind(method, cfg)
        return cls(cfg, method, tokenizer, shards, lanes, block, BlockReader(embedded, d.bad_lines), kind)

    def block(self, shard_id: int, pos: int, epoch: int) -> Block:
        """Read, map, clean, split and encode the block at `pos` of shard `shard_id`; the train
        examples come shuffled by (seed, epoch, shard, pos)."""
        from distft.data.encode import token_lengths

        cfg, d = self.cfg, self.cfg.data
        bad: list[dict] = []
        raw, end = self.reader.read(self.shards[shard_id], pos, self.block_rows, bad)
        canonical, empty, formats = to_canonical(raw, d.format, d.columns, self.kind, cfg.method.name)
        cleaned = clean(canonical, d, token_lengths(self.tokenizer), d.max_length, empty)
        parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for row in cleaned.rows:
            parts[split_of(row, cfg.train.seed, d.splits)].append(row)
        train, _ = (
            self.method.encode(parts["train"], self.tokenizer, cfg, train=True)
            if parts["train"]
            else ([], {})
        )
        random.Random(f"{cfg.train.seed}:{epoch}:{shard_id}:{pos}").shuffle(train)
        return Block(compact(train), {"val": parts["val"], "test": parts["test"]}, cleaned, bad, formats, end)

    def lane_shards(self, lane: int, epoch: int) -> list[int]:
        """The shards lane `lane` reads in `epoch` (a seeded deal of a permutation)."""
        order = list(range(len(self.shards)))
        random.Random(f"{self.cfg.train.seed}:shards:{epoch}").shuffle(order)
        return order[lane :: self.lanes]

    def begin(self, shard_id: int) -> int:
        return begin(self.shards[shard_id])


# ---------------------------------------------------------------- the start-up scan
@dataclass
class _Tally:
    counts: dict = field(default_factory=dict)
    drops: dict = field(default_factory=dict)
    pii: dict = field(default_factory=dict)
    normalized: int = 0
    conflicts: int = 0
    lengths: list = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    bad: list = field(default_factory=list)
    rows: int = 0

    def add(self, b: Block) -> None:
        c = b.cleaned
        for k, v in c.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in c.drops.items():
            d = self.drops.setdefault(k, {"count": 0, "examples": []})
            d["count"] += v["count"]
            d["examples"] = (d["examples"] + v["examples"])[:20]
        for k, v in c.pii.items():
            self.pii[k] = self.pii.get(k, 0) + v
        for k, v in b.formats.items():
            self.formats[k] = self.formats.get(k, 0) + v
        self.normalized += c.normalized
        self.conflicts += c.conflicts
        self.lengths += c.lengths or []
        self.bad += b.bad
        self.rows += c.counts.get("loaded", 0) + len(b.bad)


def scan(stream: Stream, cap: int) -> tuple[dict[str, list[dict]], list[dict], _Tally]:
    """Held-out rows: the first `cap` val and test rows in file order (a row's split is a hash of
    its prompt, so the train lanes skip exactly these rows' prompts); the first train examples as
    a sample."""
    held: dict[str, list[dict]] = {"val": [], "test": []}
    sample: list[dict] = []
    tally = _Tally()
    want = {s: cap if r > 0 else 0 for s, r in zip(("val", "test"), stream.cfg.data.splits[1:])}
    for shard_id in range(len(stream.shards)):
        pos, end = stream.begin(shard_id), stream.shards[shard_id].end
        while pos < end:
            b = stream.block(shard_id, pos, epoch=0)  # (blocks cut as one lane cuts them)
            tally.add(b)
            for name in held:
                held[name] += b.held_out[name][: want[name] - len(held[name])]
            sample += b.train[: SAMPLE - len(sample)]
            if b.end == pos:
                break
            pos = b.end
            if all(len(held[s]) >= want[s] for s in held) and len(sample) >= SAMPLE:
                return held, sample, tally
    return held, sample, tally


def report(stream: Stream, held: dict, sample: list, tally: _Tally, encoded: dict) -> dict:
    cleaned = Cleaned(held["val"] + held["test"], tally.lengths, dict(tally.counts), tally.drops, tally.pii)
    cleaned.normalized, cleaned.conflicts = tally.normalized, tally.conflicts
    for key in ("loaded", "kept", "duplicates_removed", "exact_duplicate", "near_duplicate"):
        cleaned.counts.setdefault(key, 0)
    d = stream.cfg.data
    splits = {
        "train": {"rows": "streamed", "examples": "streamed"},
        **{
            n: {"rows": len(held[n]), "examples": len(encoded[n]), "eval_examples": len(encoded[n])}
            for n in held
        },
    }
    out = data_report.build(
        sources=[{"path": p} for p in d.path] or [{"path": f"<embedded {stream.cfg.method.name} data>"}],
        bad_lines=tally.bad,
        cleaned=cleaned,
        splits=splits,
        mix=None,
        max_length=d.max_length,
        warn_ratio=d.imbalance_warn_ratio,
        formats=tally.formats,
    )
    out["method_kind"] = stream.kind
    out["streaming"] = {
        "rows_scanned": tally.rows,
        "stream_buffer": d.stream_buffer,
        "note": (
            "counts are over the rows the start-up scan read for val/test; the train stream has one lane "
            "per example of the global batch; dedup runs within a block"
        ),
    }
    return out


def prepare(cfg, method, tokenizer, output_dir: Path, is_main: bool, quiet: bool = False):
    """Every rank: the held-out rows (a deterministic scan of one lane's plan, no collective);
    rank 0 writes data_report.json and data/{val,test}.jsonl. `data.stream(lanes)` opens the
    train stream once the global batch is known."""
    from distft.data.prepared import PreparedData

    stream = Stream.open(cfg, method, tokenizer, lanes=1, block=min(cfg.data.stream_buffer, SCAN_BLOCK))
    cap = cfg.data.max_eval_examples or STREAM_EVAL
    held, sample, tally = scan(stream, cap)
    if not sample:
        raise DataError(
            f"data.streaming: no train rows in the first {tally.rows} rows read; "
            "check data.path and data.splits"
        )
    encoded = {
        n: method.encode(rows, tokenizer, cfg, train=False)[0] if rows else [] for n, rows in held.items()
    }
    rep = report(stream, held, sample, tally, encoded)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "data_report.json").write_text(json.dumps(rep, indent=2, default=str))
        folder = output_dir / "data"
        folder.mkdir(exist_ok=True)
        for name, rows in held.items():
            lines = (json.dumps({k: v for k, v in r.items() if k != "_src"}, default=str) for r in rows)
            (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        if not quiet:
            print(data_report.table(rep), flush=True)
    data = PreparedData(sample, encoded["val"], encoded["test"], held["val"], held["test"], rep)
    data.stream = partial(Stream.open, cfg, method, tokenizer)
    return data
