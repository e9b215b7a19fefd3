"""Read rows from JSONL/JSON/CSV/TSV/Parquet files, directories of them, saved `datasets`
directories, or hub dataset ids, keeping where each row came from (file:line or file#index).

JSONL is read line by line so a malformed line is reported with its file:line (skipped and listed
in the data report, or an error with data.bad_lines=error); the other formats go through
`datasets`. Several sources can be mixed with weights (`mix`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distft.errors import DataError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SUFFIXES = {".jsonl", ".json", *TABLE_SUFFIXES}
FILE_LIKE = {*SUFFIXES, ".txt", ".gz", ".zst", ".bz2", ".xz", ".arrow", ".ndjson"}  # never a hub id's tail


@dataclass
class Source:
    spec: str
    rows: list[dict] = field(default_factory=list)
    bad_lines: list[dict] = field(default_factory=list)
    """[{"where": file:line, "error": ...}] lines that could not be parsed (skipped)."""


def _decode(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    """A line as text; invalid UTF-8 names the file, line and byte offset."""
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")  # a leading BOM is not content
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: invalid UTF-8 at byte offset {offset + e.start} (byte 0x{raw[e.start]:02x}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _one_document(path: Path) -> str | None:
    """What a .jsonl file that is really one JSON document holds ('a JSON array', 'a pretty-printed
    JSON object'), or None."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return "a JSON array" if isinstance(data, list) else "one pretty-printed JSON value"


def parse_line(
    raw: bytes, path: Path, lineno: int, offset: int, where: str, bad: list[dict] | None
) -> dict | None:
    """One JSONL line as a row (tagged `_source`=where), None for a blank or (with `bad`) malformed
    line, which is appended to `bad`; without `bad` a malformed line raises."""
    line = _decode(raw, path, lineno, offset)
    if not line.strip():
        return None
    try:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    except (json.JSONDecodeError, ValueError) as e:
        msg = f"malformed JSON ({e.msg} at column {e.colno})" if hasattr(e, "colno") else str(e)
        if bad is None:
            raise DataError(
                f"{where}: {msg}; fix or remove that line (each line must be one JSON object)"
            ) from None
        bad.append({"where": where, "error": msg})
        return None
    row["_source"] = where
    return row


def read_jsonl(path: Path, bad: list[dict] | None = None) -> list[dict]:
    """Rows of a JSONL file. Malformed lines raise, or are appended to `bad` when it is given."""
    return list(iter_jsonl(path, bad))


def iter_jsonl(path: Path, bad: list[dict] | None = None) -> Iterator[dict]:
    """read_jsonl one row at a time (the file is read line by line)."""
    rows = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                row = parse_line(raw, path, lineno, offset, where, None if not rows else bad)
            except DataError:
                whole = _one_document(path) if not rows else None  # maybe the whole file is one document
                if whole:
                    raise DataError(
                        f"{path}: holds {whole}, not JSON Lines (one object per line); rename it to "
                        f"{path.with_suffix('.json').name} or write one object per line"
                    ) from None
                if bad is None:
                    raise
                row = parse_line(raw, path, lineno, offset, where, bad)
            offset += len(raw)
            if row is not None:
                rows += 1
                yield row


def read_json(path: Path) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); "
            "re-encode the file as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data":
            hint = f" (one object per line is JSON Lines: rename it to {path.with_suffix('.jsonl').name})"
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}){hint}; fix the file") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    return [dict(row, _source=f"{path}#{i}") for i, row in enumerate(data)]


def _dataset_rows(ds, where: str) -> Iterator[dict]:
    """The rows of a `datasets` Dataset a batch at a time (tagged where#index)."""
    i = 0
    for batch in ds.iter(batch_size=1000):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            yield dict(zip(cols, values), _source=f"{where}#{i}")
            i += 1


def read_table(path: Path) -> Iterator[dict]:
    """CSV/TSV (header row) or Parquet through `datasets`, a batch at a time."""
    import datasets

    builder = TABLE_SUFFIXES[path.suffix]
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # parser errors name the file themselves
        raise DataError(f"{path}: cannot read as {path.suffix[1:]} ({_first_line(e)})") from None
    return _dataset_rows(ds, str(path))


def is_saved_dataset(p: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def read_saved_dataset(p: Path) -> Iterator[dict]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return _dataset_rows(ds, str(p))


def read_path(spec: str, bad: list[dict] | None = None) -> list[dict]:
    return list(iter_path(spec, bad))


def iter_path(spec: str, bad: list[dict] | None = None) -> Iterator[dict]:
    """The rows of one data.path entry in order (JSONL files line by line)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if is_saved_dataset(p):
            yield from read_saved_dataset(p)
            return
        files = sorted(x for x in p.rglob("*") if x.suffix in SUFFIXES and x.is_file())
        if not files:
            raise DataError(
                f"data.path {spec}: directory has no .jsonl/.json/.csv/.tsv/.parquet files and is "
                "not a saved `datasets` directory"
            )
        for f in files:
            yield from iter_path(str(f), bad)
        return
    if p.is_file():
        if p.suffix == ".json":
            yield from read_json(p)
        elif p.suffix in TABLE_SUFFIXES:
            yield from read_table(p)
        else:
            yield from iter_jsonl(p, bad)
        return
    if looks_like_hub_id(spec):
        yield from _read_hub(spec)
        return
    raise DataError(
        f"data.path {spec}: no such file or directory ({p.resolve()}); give JSONL/JSON/CSV/TSV/Parquet "
        "files, a saved `datasets` directory or a hub id"
    )


def check_path(spec: str) -> None:
    """Raise read_path's error for a missing or empty local path without reading any rows (the
    launcher checks data.path before any rank starts). Hub ids are left to the ranks."""
    p = Path(spec).expanduser()
    if p.is_file():
        return
    if p.is_dir() and (is_saved_dataset(p) or any(x.suffix in SUFFIXES for x in p.rglob("*"))):
        return
    if not p.exists() and looks_like_hub_id(spec):
        return
    read_path(spec)


def looks_like_hub_id(spec: str) -> bool:
    """owner/name with no file suffix and no local directory of that owner name: a hub dataset id.
    `mydata/train.jsonl` that does not exist is a missing file, never a hub request."""
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return False
    owner, name = spec.split("/")
    return bool(owner and name) and Path(name).suffix.lower() not in FILE_LIKE and not Path(owner).exists()


def _read_hub(spec: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split="train")
    except Exception as e:  # network, auth, missing dataset
        raise DataError(f"data.path {spec}: cannot load hub dataset ({_first_line(e)})") from None
    return [dict(row, _source=f"{spec}#{i}") for i, row in enumerate(ds)]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_sources(paths: list[str], bad_lines: str = "skip") -> list[Source]:
    """One Source per data.path entry; rows are tagged with `_src` (the entry's index)."""
    sources = []
    for i, spec in enumerate(paths):
        src = Source(spec)
        src.rows = read_path(spec, src.bad_lines if bad_lines == "skip" else None)
        for row in src.rows:
            row["_src"] = i
        sources.append(src)
    return sources


def read_all(paths: list[str]) -> list[dict]:
    """All rows of all paths; a malformed line is an error."""
    return [row for spec in paths for row in read_path(spec)]


def mix(rows: list[dict], weights: list[float], seed: int) -> tuple[list[dict], dict[int, int]]:
    """Re-weight rows by their source (`_src`): source i gets a share weights[i]/sum(weights) of
    the same total, down-sampled without replacement or repeated (whole copies, then a sample).
    Returns the mixed rows (in a seeded order) and rows per source."""
    picked, counts = mix_indices([row.get("_src", 0) for row in rows], weights, seed)
    return [rows[i] for i in picked], counts


def mix_indices(sources: list[int], weights: list[float], seed: int) -> tuple[list[int], dict[int, int]]:
    """mix on row indices: `sources[i]` is row i's source."""
    by_src: dict[int, list[int]] = {}
    for i, src in enumerate(sources):
        by_src.setdefault(src, []).append(i)
    total, wsum = len(sources), sum(weights)
    rng = random.Random(f"mix:{seed}")
    out, counts = [], {}
    for i, w in enumerate(weights):
        have = by_src.get(i, [])
        want = round(total * w / wsum) if have else 0
        copies, rest = divmod(want, len(have)) if have else (0, 0)
        picked = have * copies + rng.sample(have, rest)
        counts[i] = len(picked)
        out += picked
    rng.shuffle(out)
    return out, counts
