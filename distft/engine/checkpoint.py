"""Atomic, sharded checkpoints with a manifest.

Every rank writes into step_N.tmp; once all ranks finished (agreed by one all-reduce), rank 0
writes trainer_state.json and manifest.json (size and sha256 of every file), renames the
directory to step_N and only then points checkpoints/latest at it. A crash or a full disk
mid-save leaves latest on the previous complete checkpoint; a truncated or tampered checkpoint
fails its manifest and is refused (resume=auto falls back to the newest one that passes).

With train.async_save the strategy's writer runs in the background: the rename, the manifest
and the move of `latest` happen in `wait_pending()`, which the next save and the end call.
trainer_state.json records when the checkpoint was sealed (`sealed_at`, seconds since the epoch).

Fault injection (tests, and users checking their storage): DISTFT_FAULT_SLOW_SAVE_S=<seconds>
makes every background (async) write take that much longer, as on a slow filesystem. It is
read only here and does nothing when unset.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from distft.engine import safe_load
from distft.errors import ConfigError, DistftError
from distft.runtime import dist

STATE_FILE = "trainer_state.json"
SLOW_SAVE_ENV = "DISTFT_FAULT_SLOW_SAVE_S"
MANIFEST = "manifest.json"


class CheckpointError(DistftError):
    """A checkpoint could not be written (full disk, permissions) or fails its manifest."""


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def latest(run_dir: Path) -> Path | None:
    """The checkpoint checkpoints/latest names, if complete (no manifest check: see resolve_resume)."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


# ------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(path)}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    os.replace(tmp, path / MANIFEST)


def verify(path: Path, unverified: bool = False) -> str | None:
    """None when `path` is a complete checkpoint matching its manifest, else what is wrong. A
    checkpoint without a manifest is refused unless `unverified` (resume_unverified=true)."""
    if not (path / STATE_FILE).is_file():
        return f"{path} has no {STATE_FILE} (not a complete checkpoint)"
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
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its sha256 in the manifest (corrupted or modified)"
    return None


# ------------------------------------------------------------------ resume
def _complete_steps(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=_step_of, reverse=True)


def _restarted() -> bool:
    """An elastic or SLURM restart of the same job (it started this run dir itself)."""
    return any(
        int(os.environ.get(v, "0") or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
    )


def _resolve_on_main(
    resume: str, run_dir: Path, unverified: bool
) -> tuple[Path | None, str | None, list[str]]:
    """(checkpoint, error, messages): run on rank 0 only (it reads every file for the checksums)."""
    if resume == "never":
        held = [p.name for p in _complete_steps(run_dir) if (p / STATE_FILE).is_file()]
        if not held or _restarted():
            return None, None, []
        error = (
            f"resume=never: output_dir={run_dir} holds another run's checkpoints ({', '.join(held[:3])}); "
            "a fresh start there would prune them and mix two runs in metrics.jsonl. Start the new "
            "run in a new output_dir, or continue that run with resume=auto"
        )
        return None, error, []
    if resume != "auto":
        path = Path(resume)
        if (path / "checkpoints").is_dir():
            run_dir = path  # a run dir: its latest, checked like resume=auto
        else:
            problem = verify(path, unverified)
            if problem:
                return None, f"resume={resume!r} refused: {problem}", []
            return path, None, []
    pointer = latest(run_dir)
    candidates = _complete_steps(run_dir)
    messages: list[str] = []
    if not (checkpoints_dir(run_dir) / "latest").is_file():
        if not candidates:
            return None, None, []  # nothing was ever completed here: a fresh start
        messages.append(
            f"{checkpoints_dir(run_dir) / 'latest'} is missing; resuming from the newest verified checkpoint"
        )
    elif pointer is not None:  # latest first, then older complete ones (never newer: they were not finished)
        candidates = [pointer] + [p for p in candidates if _step_of(p) < _step_of(pointer)]
    refused: list[str] = []
    for path in candidates:
        problem = verify(path, unverified)
        if problem is None:
            if refused:
                messages.append(f"falling back to the previous complete checkpoint {path}")
            elif messages:
                messages[-1] += f" {path.name}"
            return path, None, messages
        refused.append(f"checkpoint {path.name} refused: {problem}")
        messages.append(refused[-1])
    if refused:
        msg = f"no usable checkpoint in {checkpoints_dir(run_dir)}: {'; '.join(refused)}"
        return None, msg + " (resume=never in a new output_dir starts over)", messages
    return None, None, messages


_RESOLVED: dict[tuple[str, str], Path | None] = {}


def resolve_resume(resume: str, run_dir: Path, unverified: bool = False) -> Path | None:
    """The checkpoint to resume from, verified against its manifest. resume=auto falls back to the
    previous complete checkpoint when the latest one fails (and says so). A collective."""
    key = (str(resume), str(run_dir))
    if key in _RESOLVED:
        return _RESOLVED[key]
    if dist.active() and torch.distributed.get_rank() != 0:
        path, error, messages = dist.broadcast_object(None)
    else:
        path, error, messages = dist.broadcast_object(
            _resolve_on_main(str(resume), Path(run_dir), unverified)
        )
    if error:
        raise CheckpointError(error) if resume == "auto" else ConfigError(error)
    if path is not None and (not dist.active() or torch.distributed.get_rank() == 0):
        for message in messages:
            print(f"distft: {message}", flush=True)
    _RESOLVED[key] = path
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


# ------------------------------------------------------------------ RNG
def _device_rng(device: torch.device | None):
    """The RNG module of an accelerator device (torch.cuda, torch.xpu, ...); None on the CPU."""
    if device is None or device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def _rng_state(device: torch.device | None, device_rng=None) -> dict:
    """Python, CPU and this rank's own device RNG (not every visible device's: a resume may see fewer)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    rng = device_rng or _device_rng(device)
    if rng is not None:
        state["device"] = {"type": device.type, "state": rng.get_rng_state(device)}
    return state


def _set_rng_state(state: dict, device: torch.device | None, device_rng=None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    rng = device_rng or _device_rng(device)
    if rng is None:
        return
    if "device" in state and state["device"]["type"] == device.type:
        rng.set_rng_state(state["device"]["state"], device)
    elif "cuda" in state:  # older checkpoints held every visible GPU's state: take this rank's own
        index = device.index if device.index is not None else rng.current_device()
        if index < len(state["cuda"]):
            rng.set_rng_state(state["cuda"][index], device)


# ------------------------------------------------------------------ save
def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


@dataclass
class _Pending:
    handle: object  # a Future (or torch's AsyncSaveResponse) of the strategy's background write
    root: Path
    tmp: Path
    final: Path
    state: dict
    info: object
    keep_last: int


_PENDING: _Pending | None = None


def save(
    strategy,
    run_dir: Path,
    step: int,
    trainer_state: dict,
    info,
    keep_last: int,
    extra=None,
    async_ok: bool = False,
) -> Path:
    """Write step_N atomically on every rank. With async_ok and a strategy that has `save_async`,
    returns once the state is staged; the checkpoint becomes `latest` in wait_pending()."""
    global _PENDING
    wait_pending()  # the previous async save must be complete before the next one starts
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if info.is_main:
        for stale in root.glob("step_*.tmp"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {**trainer_state, "checkpoint_format": getattr(strategy, "checkpoint_format", None)}
    handle, error = None, None
    try:
        if async_ok and hasattr(strategy, "save_async"):
            handle = strategy.save_async(tmp)
        else:
            strategy.save(tmp)
        if extra is not None:
            extra(tmp)
        torch.save(_rng_state(info.device), tmp / f"rng_rank{info.rank}.pt")
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = e  # any writer failure (ENOSPC, EFBIG, EACCES) fails the save cleanly, below
    if handle is not None and error is None:
        if os.environ.get(SLOW_SAVE_ENV):
            handle = _slowed(handle, float(os.environ[SLOW_SAVE_ENV]))
        _PENDING = _Pending(handle, root, tmp, final, state, info, keep_last)
        return final
    _finish(root, tmp, final, state, info, keep_last, error)
    return final


def _slowed(handle, seconds: float) -> Future:
    """`handle`'s write, completing `seconds` later, in the background (fault injection)."""

    def write() -> None:
        time.sleep(seconds)
        getattr(handle, "upload_completion", handle).result()

    return ThreadPoolExecutor(1, thread_name_prefix="distft-slow-save").submit(write)


def wait_pending() -> None:
    """Wait for the background checkpoint write (if any), then make it complete and `latest`."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is None:
        return
    error = None
    try:
        getattr(pending.handle, "upload_completion", pending.handle).result()
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = e
    p = pending
    _finish(p.root, p.tmp, p.final, p.state, p.info, p.keep_last, error)


def _finish(root: Path, tmp: Path, final: Path, state: dict, info, keep_last: int, error) -> None:
    """Every rank wrote its part (or failed): agree, then rank 0 seals and publishes step_N."""
    previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
    (failed,) = dist.all_reduce_sum([1.0 if error is not None else 0.0], info.device)
    if not failed and info.is_main:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "sealed_at": time.time()}, indent=2))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_pointer(root, final.name)
            _prune(root, keep_last)
        except Exception as e:  # noqa: BLE001
            error = e
    (failed,) = dist.all_reduce_sum([1.0 if error is not None else 0.0], info.device)
    if failed:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = _one_line(error) if error is not None else "another rank failed to write its part"
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointError(
            f"checkpoint {final.name} was not saved ({why}); checkpoints/latest still names {previous}. "
            f"Free space ({free:.0f} MiB free) or fix permissions or limits in {root}, then "
            f"resume=auto continues from {previous}"
        )


def _one_line(error: BaseException) -> str:
    """The innermost cause's last line (DCP's exception carries every rank's whole traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def mark_best(run_dir: Path, step: int, info) -> None:
    """Point checkpoints/best at step_<step> (complete on every rank); pruning keeps it."""
    wait_pending()
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
        key=_step_of,
    )
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)


def load(strategy, path: Path, info) -> dict:
    """Load a (verified) checkpoint; no file in it can run code (distft.engine.safe_load)."""
    state = read_state(path)
    problem = safe_load.check_dcp_metadata(path / "dcp")
    if problem:
        raise CheckpointError(f"resume: {problem}")
    with safe_load.weights_only_loads():
        strategy.load(path)
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():  # a rank the saving run did not have starts from its seeded RNG
        _set_rng_state(torch.load(rng, weights_only=True), info.device)
    return state


def check_compatible(strategy, state: dict, path: Path, strategy_name: str) -> None:
    """Refuse, with the way out, a checkpoint the strategy cannot read (DCP vs DeepSpeed)."""
    saved = state.get("checkpoint_format")
    mine = getattr(strategy, "checkpoint_format", None)
    if saved and mine and saved != mine:
        raise ConfigError(
            f"resume: {path} was written by strategy={state.get('strategy')} ({saved} format); "
            f"strategy={strategy_name} reads {mine} checkpoints only. Resume with a strategy of the "
            f"saved family, or start over from its weights: resume=never "
            f"model.name_or_path=<the run's export/ directory>"
        )
