"""Continual learning: mix a replay fraction of old data into the new train split.

Continuing from earlier training is config, not a separate tool:
  full weights:  model.name_or_path=<run>/export          (any exported or merged HF directory)
  an adapter:    tuning=lora tuning.init_adapter=<run>/export model.name_or_path=<run>/export/base
  new data:      data.path=[new.jsonl]
  replay:        data.replay_path=[old.jsonl] data.replay_fraction=0.2
Replayed rows pass through the same schema mapping and cleaning as the new rows, go into the train
split only (val/test measure the new data), and never duplicate a val/test row.
"""

from __future__ import annotations

import json
import random

from distft.errors import DataError


def check(paths: list[str], fraction: float) -> None:
    # DataError, not ConfigError: raised while rank 0 prepares data, which the other ranks wait on.
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.replay_fraction={fraction}: give a share of the train split in [0, 1)")
    if fraction > 0 and not paths:
        raise DataError(f"data.replay_fraction={fraction} needs data.replay_path (the old data to replay)")
    if paths and fraction == 0:
        raise DataError(
            "data.replay_path is set but data.replay_fraction=0; set e.g. data.replay_fraction=0.2"
        )


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, sort_keys=True, default=str)


def replay_count(n_new: int, fraction: float) -> int:
    """Old rows so that they make up `fraction` of the mixed train split."""
    return round(n_new * fraction / (1.0 - fraction))


def mix_replay(parts: dict[str, list[dict]], cfg, method, lengths) -> dict | None:
    """Add sampled old rows to parts['train'] (in place); returns what the data report shows."""
    d = cfg.data
    paths, fraction = list(getattr(d, "replay_path", []) or []), float(getattr(d, "replay_fraction", 0.0))
    check(paths, fraction)
    if not paths:
        return None
    old = _load_old(paths, cfg, method, lengths)
    held_out = {_key(r) for name in ("val", "test") for r in parts.get(name, [])}
    pool = [r for r in old if _key(r) not in held_out]
    if not pool:
        raise DataError(f"data.replay_path {', '.join(paths)}: no rows left to replay after cleaning")
    want = replay_count(len(parts["train"]), fraction)
    rng = random.Random(f"replay:{cfg.train.seed}")
    picked = rng.sample(pool, min(want, len(pool)))
    mixed = parts["train"] + [dict(r, _replay=True) for r in picked]
    rng.shuffle(mixed)
    parts["train"] = mixed
    info = {
        "paths": paths,
        "fraction_requested": fraction,
        "rows_available": len(pool),
        "rows_replayed": len(picked),
        "fraction": len(picked) / max(len(mixed), 1),
        "dropped_as_val_test_duplicates": len(old) - len(pool),
    }
    if len(picked) < want:
        info["note"] = f"only {len(pool)} old rows: the replay share is lower than requested"
    return info


def _load_old(paths: list[str], cfg, method, lengths) -> list[dict]:
    """Old rows read, mapped and cleaned exactly like data.path rows (`lengths`: the pipeline's
    token-length function)."""
    from distft.data.clean import clean
    from distft.data.schemas import to_canonical
    from distft.data.sources import read_sources

    d = cfg.data
    rows = [r for s in read_sources(paths, d.bad_lines) for r in s.rows]
    declared = getattr(method, "data_schema", None) or getattr(method, "kind", None)
    kind = declared if isinstance(declared, str) else None
    canonical, empty, _ = to_canonical(rows, d.format, d.columns, kind, cfg.method.name)
    return clean(canonical, d, lengths, d.max_length, empty).rows
