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
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from distft.data.collate import pack_bins
from distft.data.preference import Skips
from distft.data.rows import Rows, RowWriter, write_rows
from distft.data.schemas import length_text
from distft.data.sft_format import SftTokens, encode_texts, render, sft_tokens
from distft.errors import DataError

CHUNK = 2000
_WORKER: dict = {}


def _init(method, tokenizer, cfg, train: bool) -> None:
    _WORKER.update(method=method, tokenizer=tokenizer, cfg=cfg, train=train)


def _encode_chunk(chunk: tuple[int, list[dict]]) -> tuple[list[dict], dict]:
    w, (start, rows) = _WORKER, chunk
    if hasattr(w["method"], "encode_chunk"):  # examples that refer to their row's place in the split
        return w["method"].encode_chunk(rows, w["tokenizer"], w["cfg"], w["train"], start)
    return w["method"].encode(rows, w["tokenizer"], w["cfg"], train=w["train"])


def _chunks(part: list[dict]) -> Iterator[tuple[int, list[dict]]]:
    yield 0, part[:CHUNK]  # an empty split still gets the encoder's stats
    for i in range(CHUNK, len(part), CHUNK):
        yield i, part[i : i + CHUNK]


def _encoded(part, method, tokenizer, cfg, train: bool, num_proc: int) -> Iterator[tuple[list[dict], dict]]:
    """Each chunk's examples and stats in order; workers inherit the tokenizer and method (fork),
    nothing is pickled but rows, and only a few chunks are read ahead of the writer."""
    from distft.data.batched import ordered

    n = num_proc if len(part) > CHUNK else 1
    for job in ordered(_encode_chunk, _chunks(part), n, _init, (method, tokenizer, cfg, train)):
        yield job()


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
    name: str, part: Sequence[dict], train: bool, cfg, method, tokenizer, folder: Path
) -> tuple[Rows, dict]:
    """The split's examples in folder/<name>.arrow (memory-mapped) and the encoder's stats."""
    path = folder / f"{name}.arrow"
    if not chunked(method):
        examples, stats = method.encode(list(part), tokenizer, cfg, train=train)
        return Rows(path, write_rows(path, examples)), stats
    packing = train and cfg.data.packing and row_wise(method)
    linked = hasattr(method, "link_split")
    run_cfg = _chunk_cfg(cfg, packing)
    stats: dict = {}
    lengths: list[int] = []
    first = folder / f"{name}.{'unpacked' if packing else 'unlinked'}.arrow"
    writer = RowWriter(first if packing or linked else path)
    try:
        for examples, chunk_stats in _encoded(part, method, tokenizer, run_cfg, train, cfg.data.num_proc):
            writer.add(examples)
            lengths += [len(ex["input_ids"]) for ex in examples if "input_ids" in ex]
            _merge(stats, chunk_stats)
    except DataError:
        if row_wise(method):
            raise
        # A check of one chunk (e.g. RL's "every prompt is too long") may not hold for the whole
        # split: encode it in one call, which raises only when the split fails it.
        writer.close()
        examples, stats = method.encode(list(part), tokenizer, cfg, train=train)
        return Rows(path, write_rows(path, examples)), stats
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
    first.unlink()
    stats["packed_sequences"] = len(bins)
    return out, stats


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
