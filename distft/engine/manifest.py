"""manifest.json: size and sha256 of every file of a checkpoint, hashed by all ranks together.

Hashing a large checkpoint takes minutes; done by rank 0 alone, the other ranks would sit in a
collective with the process-group timeout running (and be killed by the watchdog). Instead every
rank hashes its share of the files (balanced by size, the same split on every rank) and only then
joins one gather; rank 0 writes the manifest. Verification at resume is split the same way.

The manifest detects corruption (a truncated, missing or changed file), not tampering: whoever can
write the run dir can rewrite the manifest too (distft.engine.safe_load keeps loads from running
code).

Fault injection (tests, and users checking their storage): DISTFT_FAULT_SLOW_HASH_S=<seconds>
makes hashing each file take that much longer, as reading back from a slow filesystem. It is read
only here and does nothing when unset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from distft.runtime import dist

MANIFEST = "manifest.json"
SLOW_HASH_ENV = "DISTFT_FAULT_SLOW_HASH_S"


def sha256(path: Path) -> str:
    if os.environ.get(SLOW_HASH_ENV):
        time.sleep(float(os.environ[SLOW_HASH_ENV]))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files: largest first to the least loaded rank (deterministic on every rank)."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[name] + 1
        if r == rank:
            mine.append(name)
    return mine


def _rank_world() -> tuple[int, int]:
    if dist.active():
        import torch.distributed as tdist

        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def write(path: Path) -> str | None:
    """Every rank: hash its share of `path`'s files; rank 0 writes manifest.json. A collective
    (one gather, joined after the hashing). Returns an error (the same on every rank) or None."""
    rank, world = _rank_world()
    try:
        sizes = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        sizes = {n: s for n, s in sizes.items() if not Path(n).name.startswith((MANIFEST, f".{MANIFEST}"))}
        mine = {n: sha256(path / n) for n in share(sizes, rank, world)}
        result: dict | str = mine
    except OSError as e:
        result = f"{type(e).__name__}: {e}"
    parts = dist.all_gather_objects(result)
    errors = [p for p in parts if isinstance(p, str)]
    if errors:
        return errors[0]
    if rank == 0:
        hashes = {n: h for p in parts for n, h in p.items()}
        files = {n: {"size": sizes[n], "sha256": hashes[n]} for n in sorted(sizes)}
        tmp = path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
        os.replace(tmp, path / MANIFEST)
    return None


def verify(path: Path, required: str, unverified: bool = False) -> str | None:
    """None when `path` is complete and matches its manifest, else what is wrong. Every rank
    checks presence and sizes and hashes its share; a collective when ranks are joined."""
    rank, world = _rank_world()
    problem = _check(path, required, unverified, rank, world)
    problems = [p for p in dist.all_gather_objects(problem) if p]
    return problems[0] if problems else None


def _check(path: Path, required: str, unverified: bool, rank: int, world: int) -> str | None:
    if not (path / required).is_file():
        return f"{path} has no {required} (not a complete checkpoint)"
    manifest = path / MANIFEST
    if not manifest.is_file():
        if unverified:
            return None
        return (
            f"{path} has no {MANIFEST}, so its files cannot be checked (resume_unverified=true loads it "
            "anyway: only for a checkpoint you wrote yourself)"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, the manifest says {want['size']} (truncated or replaced)"
    for rel in share({rel: want["size"] for rel, want in files.items()}, rank, world):
        if sha256(path / rel) != files[rel]["sha256"]:
            return f"{path / rel} does not match its sha256 in the manifest (corrupted or modified)"
    return None
