"""The prepared-data cache shared by runs, resumes and sweep trials: `data.cache_dir/<key>/`.

The key covers everything that changes the prepared rows: the sources' content (sha256 of each
file; a hub id by name), the data.* settings that shape cleaning, splitting and encoding, the
method and its settings, the seed, the tokenizer (its vocabulary, rules and chat template, not its
path) and the code that prepares (distft/data, the methods). Keys that only pick what is read
later (data.max_eval_examples, data.max_eval_generations, data.num_proc, data.cache_dir) are left
out, so changing them reuses the entry.

One writer per key: the preparer holds an exclusive `flock` on `<key>.lock`, builds into a
temporary directory and renames it to `<key>` (atomic), so a reader sees a whole entry or none;
a second preparer of the same key waits on the lock and then reuses what the first wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import distft

NOT_IN_KEY = {"cache_dir", "num_proc", "max_eval_examples", "max_eval_generations"}
COMPLETE = "meta.json"


def cache_root(data_cfg) -> Path:
    """data.cache_dir, or $XDG_CACHE_HOME/distft/data (~/.cache/distft/data)."""
    if getattr(data_cfg, "cache_dir", ""):
        return Path(data_cfg.cache_dir).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distft" / "data"


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def source_fingerprint(spec: str) -> str:
    """sha256 over a path's files (names relative to it and contents); a hub id by its name."""
    p = Path(spec).expanduser()
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            _file_digest(f, h)
    elif p.is_file():
        _file_digest(p, h)
    else:
        h.update(f"hub:{spec}".encode())
    return f"{p.resolve() if p.exists() else spec}:{h.hexdigest()}"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        type(tokenizer).__name__,
        str(len(tokenizer)),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(tokenizer.pad_token_id),
        str(tokenizer.eos_token_id),
        str(tokenizer.bos_token_id),
        str(getattr(tokenizer, "padding_side", "")),
    ]
    h.update("\n".join(extra).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    root = Path(distft.__file__).parent
    h = hashlib.sha256()
    for sub in ("data", "methods"):  # methods/rl included
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f.read_bytes())
    h.update((root / "continual.py").read_bytes())
    return h.hexdigest()


def cache_key(cfg, tokenizer) -> str:
    d = cfg.data
    data_settings = {f.name: getattr(d, f.name) for f in fields(d) if f.name not in NOT_IN_KEY}
    parts = [
        repr(sorted(data_settings.items())),
        repr(cfg.method),
        str(cfg.train.seed),
        tokenizer_fingerprint(tokenizer),
        _code_fingerprint(),
    ]
    for spec in [*d.path, *getattr(d, "replay_path", [])]:
        parts.append(source_fingerprint(spec))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def entry(root: Path, key: str) -> Path:
    return root / key


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


@contextmanager
def writer_lock(root: Path, key: str):
    """Exclusive lock for preparing `key` (released when the holder exits, even if it is killed)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, final: Path, meta: dict) -> None:
    """Mark the entry complete and move it into place in one rename."""
    (tmp / COMPLETE).write_text(json.dumps(meta, indent=1))
    if final.exists():  # an incomplete leftover of a killed writer (we hold the lock)
        shutil.rmtree(final)
    os.rename(tmp, final)


def new_tmp(root: Path, key: str) -> Path:
    """A fresh build directory; leftovers of killed writers of this key go (we hold its lock)."""
    for old in root.glob(f"{key}.tmp*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = root / f"{key}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp
