"""load → map schemas → clean → split → mix → encode (method-specific) → cached per run; one rank
prepares, the rest read.

Other ranks wait on the cache file, not on a collective, so a slow tokenization never races the
process group's timeout (the multi-node hang users of peers report). Rank 0 also writes
data_report.json and the prepared splits (data/{train,val,test}.jsonl, canonical rows) to the
run dir and prints the report table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from distft.continual import mix_replay
from distft.data import report as data_report
from distft.data.clean import clean
from distft.data.schemas import length_text, method_kind, to_canonical
from distft.data.sources import Source, mix, read_sources
from distft.data.split import split_rows
from distft.errors import DataError


@dataclass
class PreparedData:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    val_rows: list[dict]
    test_rows: list[dict]
    report: dict = field(default_factory=dict)
    split_rows: dict = field(default_factory=dict)
    """Cleaned rows per split (written to data/*.jsonl by rank 0; not cached)."""


def load_sources(cfg, method) -> list[Source]:
    if cfg.data.path:
        sources = read_sources(cfg.data.path, cfg.data.bad_lines)
        where = ", ".join(cfg.data.path)
    else:
        rows = method.default_rows(cfg)
        for row in rows:
            row["_src"] = 0
        sources = [Source(f"<embedded {cfg.method.name} data>", rows)]
        where = f"the embedded default data of method={cfg.method.name}"
    if not any(s.rows for s in sources):
        bad = sum(len(s.bad_lines) for s in sources)
        extra = f" ({bad} malformed lines skipped)" if bad else ""
        raise DataError(f"no rows in {where}{extra}; check data.path")
    return sources


def token_lengths(tokenizer):
    def lengths(rows: list[dict]) -> list[int]:
        if not rows:
            return []
        texts = [length_text(r, tokenizer) for r in rows]
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id is not None
        # prompt/completion rows get an EOS appended by the SFT encoder
        return [len(x) + (eos and "completion" in r) for x, r in zip(ids, rows)]

    return lengths


def prepare(cfg, method, tokenizer) -> PreparedData:
    d = cfg.data
    sources = load_sources(cfg, method)
    rows = [r for s in sources for r in s.rows]
    declared = getattr(method, "data_schema", None) or getattr(method, "kind", None)
    kind = declared if isinstance(declared, str) else None
    canonical, empty, formats = to_canonical(rows, d.format, d.columns, kind, cfg.method.name)
    cleaned = clean(canonical, d, token_lengths(tokenizer), d.max_length, empty)
    if not cleaned.rows:
        drops = ", ".join(f"{k} {v['count']}" for k, v in cleaned.drops.items())
        raise DataError(f"no rows left after cleaning ({drops}); check data.path and the data.* filters")
    train, val, test = split_rows(cleaned.rows, d.splits, cfg.train.seed, d.stratify)
    parts = {"train": train, "val": val, "test": test}
    mixed = None
    if d.weights:
        parts["train"], per_source = mix(parts["train"], d.weights, cfg.train.seed)
        mixed = {d.path[i]: n for i, n in per_source.items()}
    replay = mix_replay(
        parts, cfg, method, token_lengths(tokenizer)
    )  # continual learning: old rows into train

    splits, encoded = {}, {}
    for name, part in parts.items():
        examples, stats = method.encode(part, tokenizer, cfg, train=name == "train")
        encoded[name] = examples
        splits[name] = {"rows": len(part), "examples": len(examples), **stats}
    if not encoded["train"]:
        raise DataError(
            f"the train split is empty after encoding ({splits['train']}); "
            "check data.path, data.max_length and data.splits"
        )
    src_info = [
        {"path": s.spec, "rows": len(s.rows), "bad_lines": len(s.bad_lines)}
        | ({"weight": d.weights[i]} if d.weights else {})
        for i, s in enumerate(sources)
    ]
    report = data_report.build(
        sources=src_info,
        bad_lines=[b for s in sources for b in s.bad_lines],
        cleaned=cleaned,
        splits=splits,
        mix=mixed,
        max_length=d.max_length,
        warn_ratio=d.imbalance_warn_ratio,
        formats=formats,
    )
    report["method_kind"] = kind or method_kind(method, cfg)
    report.update({"replay": replay} if replay else {})
    return PreparedData(
        encoded["train"], encoded["val"], encoded["test"], parts["val"], parts["test"], report, parts
    )


def write_prepared(output_dir: Path, data: PreparedData) -> None:
    """data_report.json and the cleaned, split rows (canonical form) as JSONL."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "data_report.json").write_text(json.dumps(data.report, indent=2, default=str))
    parts = data.split_rows
    folder = output_dir / "data"
    folder.mkdir(exist_ok=True)
    for name, rows in parts.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: v for k, v in row.items() if k != "_src"}, default=str) + "\n")


def _fingerprint(spec: str) -> list[str]:
    p = Path(spec).expanduser()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.exists() else []
    return [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]


def _cache_key(cfg, tokenizer) -> str:
    parts = [
        repr(cfg.data),
        repr(cfg.method),
        str(cfg.train.seed),
        tokenizer.name_or_path,
        str(len(tokenizer)),
    ]
    for spec in cfg.data.path:
        parts += _fingerprint(spec)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_cached(
    cfg, method, tokenizer, output_dir: Path, is_main: bool, quiet: bool = False
) -> PreparedData:
    cache = output_dir / "data_cache" / f"{_cache_key(cfg, tokenizer)}.json"
    failed = cache.with_suffix(".failed")
    if is_main and not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        try:
            data = prepare(cfg, method, tokenizer)
        except DataError as e:
            failed.write_text(str(e))
            raise
        write_prepared(output_dir, data)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({k: v for k, v in data.__dict__.items() if k != "split_rows"}, default=str))
        os.replace(tmp, cache)
        if not quiet:
            print(data_report.table(data.report), flush=True)
        return data
    start = time.monotonic()
    next_note = 60.0
    while not cache.is_file():
        if failed.is_file():
            raise DataError(failed.read_text())
        time.sleep(0.2)
        if time.monotonic() - start > next_note:
            print(f"waiting for rank 0 to prepare data ({cache})", flush=True)
            next_note += 60.0
    return PreparedData(**json.loads(cache.read_text()))
