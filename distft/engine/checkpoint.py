"""Atomic, sharded checkpoints: every rank writes into step_N.tmp, then rank 0 renames it and only
then points checkpoints/latest at it. A crash mid-save leaves latest on the previous step."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from distft import dist
from distft.errors import ConfigError

STATE_FILE = "trainer_state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if (path / "checkpoints" / "latest").is_file():
        return latest(path)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def save(strategy, run_dir: Path, step: int, trainer_state: dict, info, keep_last: int, extra=None) -> Path:
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    strategy.save(tmp)
    if extra is not None:
        extra(tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    dist.barrier()
    if info.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_pointer(root, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def mark_best(run_dir: Path, step: int, info) -> None:
    """Point checkpoints/best at step_<step> (already complete on every rank); pruning keeps it."""
    if info.is_main:
        root = checkpoints_dir(run_dir)
        tmp = root / f".best.tmp{os.getpid()}"
        tmp.write_text(f"step_{step}\n")
        os.replace(tmp, root / "best")
    dist.barrier()


def best(run_dir: Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / "best"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def _prune(root: Path, keep_last: int) -> None:
    pointer = root / "best"
    keep = pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and p.name != keep),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)


def load(strategy, path: Path, info) -> dict:
    state = json.loads((path / STATE_FILE).read_text())
    strategy.load(path)
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state
