"""load → map schemas → clean → split → mix (in batches, distft/data/batched.py) → encode
(method-specific, in chunks, distft/data/encode.py) → Arrow cache shared by runs
(distft/data/cache.py); one rank prepares, every rank memory-maps the result.

Other ranks wait on a file, not on a collective, so a slow tokenization never races the process
group's timeout (the multi-node hang users of peers report). Rank 0 also writes data_report.json
and the prepared splits (data/{train,val,test}.jsonl, canonical rows) to the run dir and prints
the report table.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from distft.continual import mix_replay
from distft.data import cache as data_cache
from distft.data import report as data_report
from distft.data.batched import Store, prepare_rows
from distft.data.collate import packing_efficiency
from distft.data.encode import RowCopies, encode_split, row_wise, sft_lengths_and_tokens, token_lengths
from distft.data.prepared import PreparedData
from distft.data.rows import Rows
from distft.data.schemas import method_kind
from distft.errors import DataError


def encode_in_memory(name: str, part, train: bool, cfg, method, tokenizer):
    return method.encode(list(part), tokenizer, cfg, train=train)


def prepare(cfg, method, tokenizer, encoder=encode_in_memory, folder: Path | None = None) -> PreparedData:
    """Every step in this process (and data.num_proc workers); `encoder(name, rows, train, cfg,
    method, tokenizer)` gives a split's examples and stats (in memory here; batched into Arrow
    files for the cache). Rows are read, cleaned and split in batches (distft/data/batched.py)
    into a row store in `folder`: without a folder (the in-memory path) a temporary one, and
    the splits come back as lists."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="distft-rows-") as tmp:
            return _prepare(cfg, method, tokenizer, encoder, Path(tmp), in_memory=True)
    return _prepare(cfg, method, tokenizer, encoder, folder, in_memory=False)


def _prepare(cfg, method, tokenizer, encoder, folder: Path, in_memory: bool) -> PreparedData:
    d = cfg.data
    declared = getattr(method, "data_schema", None) or getattr(method, "kind", None)
    kind = declared if isinstance(declared, str) else None
    embedded = None if d.path else method.default_rows(cfg)
    store = Store(folder / "rows.arrow")
    # SFT rows are tokenized once, while cleaning (their lengths), and the encoder reads the tokens
    # back from the store: not for a VLM (its processor encodes) or rows that become lists below
    reuse = row_wise(method) and getattr(tokenizer, "processor", None) is None
    reuse = reuse and not (in_memory or getattr(d, "replay_path", None))
    tokens_of = sft_lengths_and_tokens(tokenizer) if reuse else None
    prepared = prepare_rows(cfg, method, token_lengths(tokenizer), store, kind, embedded, tokens_of)
    cleaned, seen = prepared.cleaned, prepared.sources
    src_info = [
        {"path": spec, "rows": seen.rows[i], "bad_lines": len(seen.bad_lines[i])}
        | ({"weight": d.weights[i]} if d.weights else {})
        for i, spec in enumerate(seen.specs)
    ]
    if not len(cleaned.rows):
        drops = ", ".join(f"{k} {v['count']}" for k, v in cleaned.drops.items())
        raise DataError(f"no rows left after cleaning ({drops}); check data.path and the data.* filters")
    parts: dict = dict(prepared.parts)
    mixed = None
    if d.weights:
        mixed = {d.path[i]: n for i, n in prepared.mixed.items()}
    if in_memory or getattr(d, "replay_path", None):  # replay mixes lists of rows
        parts = {name: list(part) for name, part in parts.items()}
    replay = mix_replay(
        parts, cfg, method, token_lengths(tokenizer)
    )  # continual learning: old rows into train

    splits, encoded = {}, {}
    for name, part in parts.items():
        examples, stats = encoder(name, part, name == "train", cfg, method, tokenizer)
        encoded[name] = examples
        splits[name] = {"rows": len(part), "examples": len(examples), **stats}
        if "packed_sequences" in stats:
            tokens = (
                examples.lengths() if isinstance(examples, Rows) else [len(x["input_ids"]) for x in examples]
            )
            stats = splits[name]
            stats["packing_efficiency"] = round(packing_efficiency(tokens, len(examples), d.max_length), 4)
    if not encoded["train"]:
        raise DataError(
            f"the train split is empty after encoding ({splits['train']}); "
            "check data.path, data.max_length and data.splits"
        )
    report = data_report.build(
        sources=src_info,
        bad_lines=[b for bad in seen.bad_lines for b in bad],
        cleaned=cleaned,
        splits=splits,
        mix=mixed,
        max_length=d.max_length,
        warn_ratio=d.imbalance_warn_ratio,
        formats=prepared.formats,
    )
    report["method_kind"] = kind or method_kind(method, cfg)
    if "packing_efficiency" in splits["train"]:
        report["packing"] = {
            "sequences": splits["train"]["packed_sequences"],
            "efficiency": splits["train"]["packing_efficiency"],
        }
    report.update({"replay": replay} if replay else {})
    return PreparedData(
        encoded["train"], encoded["val"], encoded["test"], parts["val"], parts["test"], report, parts
    )


def write_prepared(output_dir: Path, data: PreparedData, rows: bool = True) -> None:
    """data_report.json and (with `rows`) the cleaned, split rows (canonical form) as JSONL in data/
    (`encode.copy_texts` renders them: the cache entry's copies are written while encoding)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "data_report.json").write_text(json.dumps(data.report, indent=2, default=str))
    for name, part in data.split_rows.items() if rows else ():
        RowCopies(output_dir / "data" / f"{name}.jsonl").write(part)


SPLIT_FILES = ("train", "val", "test", "val_rows", "test_rows")
COPY_LIMIT = 64 << 20  # the run dir gets its own copy of data/*.jsonl below this size, else a link


def _build_entry(cfg, method, tokenizer, root: Path, key: str) -> None:
    """Prepare and write one cache entry (the caller holds the key's writer lock). The encoding
    workers also render data/<split>.jsonl and the val/test rows, written as chunks come back."""
    tmp = data_cache.new_tmp(root, key)

    def to_arrow(name, part, train, cfg, method, tokenizer):
        held_out = tmp / f"{name}_rows.arrow" if name != "train" else None
        copies = RowCopies(tmp / "data" / f"{name}.jsonl", held_out)
        return encode_split(name, part, train, cfg, method, tokenizer, tmp, copies)

    data = prepare(cfg, method, tokenizer, to_arrow, tmp)
    write_prepared(tmp, data, rows=False)
    encodings = {name: getattr(data, name).encoding for name in ("train", "val", "test")}
    encodings.update(val_rows="json", test_rows="json")  # RowCopies write them in the json encoding
    del data
    (tmp / "rows.arrow").unlink()  # the cleaned rows' store (data/*.jsonl and the splits keep them)
    meta = {"key": key, "encodings": encodings, "created": time.time()}
    data_cache.publish(tmp, root / key, meta)


def _open_entry(path: Path) -> PreparedData:
    meta = json.loads((path / data_cache.COMPLETE).read_text())
    splits = {name: Rows(path / f"{name}.arrow", meta["encodings"][name]) for name in SPLIT_FILES}
    return PreparedData(**splits, report=json.loads((path / "data_report.json").read_text()))


def _load_entry(path: Path, cfg) -> PreparedData:
    data = _open_entry(path)
    cap = cfg.data.max_eval_examples  # read-time, so it is not part of the cache key
    if cap and len(data.val) > cap:
        data.val = data.val.head(cap)
    data.report["splits"]["val"]["eval_examples"] = len(data.val)
    data.report["cache"] = str(path)
    return data


def _link_run_files(output_dir: Path, entry: Path, report: dict) -> None:
    """data_report.json and data/*.jsonl in the run dir (a copy, or a link to the cache when large)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "data_report.json").write_text(json.dumps(report, indent=2, default=str))
    folder, src = output_dir / "data", entry / "data"
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    if sum(f.stat().st_size for f in src.iterdir()) <= COPY_LIMIT:
        shutil.copytree(src, folder)
    else:
        folder.symlink_to(src, target_is_directory=True)


def prepare_cached(
    cfg, method, tokenizer, output_dir: Path, is_main: bool, quiet: bool = False
) -> PreparedData:
    """Prepared data from the shared cache (data.cache_dir), prepared by rank 0 when missing.

    Other ranks wait for rank 0's pointer file in the run dir (no collective while it works), then
    memory-map the same Arrow files. With data.streaming nothing is cached (distft/data/stream.py)."""
    if cfg.data.streaming:
        from distft.data import stream

        return stream.prepare(cfg, method, tokenizer, output_dir, is_main, quiet)
    root, key = data_cache.cache_root(cfg.data), data_cache.cache_key(cfg, tokenizer)
    path = root / key
    marks = output_dir / "data_cache"
    ready, failed = marks / f"{key}.ready", marks / f"{key}.failed"
    if is_main:
        marks.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        try:
            if not data_cache.is_complete(path):
                with data_cache.writer_lock(root, key):  # another run may be preparing this key
                    if not data_cache.is_complete(path):
                        _build_entry(cfg, method, tokenizer, root, key)
        except DataError as e:
            failed.write_text(str(e))
            raise
        data = _load_entry(path, cfg)
        _link_run_files(output_dir, path, data.report)
        ready.write_text(str(path))
        if not quiet:
            print(data_report.table(data.report), flush=True)
        return data
    start = time.monotonic()
    next_note = 60.0
    while not ready.is_file():
        if failed.is_file():
            raise DataError(failed.read_text())
        time.sleep(0.2)
        if time.monotonic() - start > next_note:
            print(f"waiting for rank 0 to prepare data ({path})", flush=True)
            next_note += 60.0
    if not data_cache.is_complete(path):
        raise DataError(
            f"rank 0 prepared the data in {path}, which this node cannot see; set data.cache_dir to a "
            "directory every node shares (e.g. next to output_dir)"
        )
    return _load_entry(path, cfg)


def load_run_data(run_dir: Path) -> PreparedData:
    """The prepared data a run used (through its pointer into the cache), uncapped."""
    pointers = sorted(Path(run_dir, "data_cache").glob("*.ready"), key=lambda p: p.stat().st_mtime)
    if not pointers:
        raise DataError(f"{run_dir}: no prepared data (run distft-data or a training run first)")
    return _open_entry(Path(pointers[-1].read_text()))
