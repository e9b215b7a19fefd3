"""Read rows from JSONL/JSON files, directories of them, or hub dataset ids, keeping file:line."""

from __future__ import annotations

import json
from pathlib import Path

from distft.errors import DataError


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or "
                    "remove that line (each line must be one JSON object)"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            row["_source"] = f"{path}:{lineno}"
            rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects")
    return [dict(row, _source=f"{path}#{i}") for i, row in enumerate(data)]


def read_path(spec: str) -> list[dict]:
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.suffix in (".jsonl", ".json"))
        if not files:
            raise DataError(f"data.path {spec}: directory has no .jsonl or .json files")
        return [row for f in files for row in read_path(str(f))]
    if p.is_file():
        if p.suffix == ".json":
            return read_json(p)
        return read_jsonl(p)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _read_hub(spec)
    raise DataError(f"data.path {spec}: no such file or directory; give JSONL/JSON files or a hub id")


def _read_hub(spec: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split="train")
    except Exception as e:  # network, auth, missing dataset
        raise DataError(f"data.path {spec}: cannot load hub dataset ({e})") from None
    return [dict(row, _source=f"{spec}#{i}") for i, row in enumerate(ds)]


def read_all(paths: list[str]) -> list[dict]:
    return [row for spec in paths for row in read_path(spec)]
