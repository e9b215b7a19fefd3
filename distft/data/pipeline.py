"""load → split → encode (method-specific) → cached per run; one rank prepares, the rest read.

Other ranks wait on the cache file, not on a collective, so a slow tokenization never races the
process group's timeout (the multi-node hang users of peers report).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from distft.data.sources import read_all
from distft.errors import DataError


@dataclass
class PreparedData:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    val_rows: list[dict]
    test_rows: list[dict]
    report: dict = field(default_factory=dict)


def split_rows(rows: list[dict], ratios: list[float], seed: int) -> tuple[list, list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    total = sum(ratios)
    n_val = int(len(rows) * ratios[1] / total)
    n_test = int(len(rows) * ratios[2] / total)
    if ratios[1] > 0 and n_val == 0 and len(rows) >= 3:
        n_val = 1
    if ratios[2] > 0 and n_test == 0 and len(rows) >= 3:
        n_test = 1
    val = [rows[i] for i in order[:n_val]]
    test = [rows[i] for i in order[n_val : n_val + n_test]]
    train = [rows[i] for i in order[n_val + n_test :]]
    return train, val, test


def load_rows(cfg, method) -> list[dict]:
    if cfg.data.path:
        rows = read_all(cfg.data.path)
        where = ", ".join(cfg.data.path)
    else:
        rows = method.default_rows(cfg)
        where = f"the embedded default data of method={cfg.method.name}"
    if not rows:
        raise DataError(f"no rows in {where}; check data.path")
    return rows


def prepare(cfg, method, tokenizer) -> PreparedData:
    rows = load_rows(cfg, method)
    train_rows, val_rows, test_rows = split_rows(rows, cfg.data.splits, cfg.train.seed)
    report: dict = {"rows": len(rows), "splits": {}}
    encoded = {}
    for name, part in (("train", train_rows), ("val", val_rows), ("test", test_rows)):
        examples, stats = method.encode(part, tokenizer, cfg, train=name == "train")
        encoded[name] = examples
        report["splits"][name] = {"rows": len(part), "examples": len(examples), **stats}
    if not encoded["train"]:
        raise DataError(
            f"the train split is empty after encoding ({report['splits']['train']}); "
            "check data.path, data.max_length and data.splits"
        )
    return PreparedData(encoded["train"], encoded["val"], encoded["test"], val_rows, test_rows, report)


def _cache_key(cfg, tokenizer) -> str:
    parts = [
        repr(cfg.data),
        repr(cfg.method),
        str(cfg.train.seed),
        tokenizer.name_or_path,
        str(len(tokenizer)),
    ]
    for spec in cfg.data.path:
        p = Path(spec)
        if p.exists():
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_cached(cfg, method, tokenizer, output_dir: Path, is_main: bool) -> PreparedData:
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
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data.__dict__))
        os.replace(tmp, cache)
        (output_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
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
