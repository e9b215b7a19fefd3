"""Atomic, sharded checkpoints with a manifest, kept by a `Checkpointer` (one per run, no
module-level state).

Every rank writes into step_N.tmp; once all ranks finished (agreed by one all-reduce), rank 0
has written trainer_state.json, every rank hashes its share of the files and rank 0 writes
manifest.json (distft.engine.manifest), renames the directory to step_N and only then points
checkpoints/latest at it. A crash or a full disk mid-save leaves latest on the previous complete
checkpoint; a truncated or corrupted checkpoint, or one without a manifest, is refused (resume=auto
falls back to the newest one that passes; resume_unverified=true accepts one without a manifest).

With train.async_save the strategy's writer runs in the background: the rename, the manifest
and the move of `latest` happen in `wait_pending()`, which the next save and the end call.
trainer_state.json records when the checkpoint was sealed (`sealed_at`, seconds since the epoch).

Fault injection (tests, and users checking their storage): DISTFT_FAULT_SLOW_SAVE_S=<seconds>
makes every background (async) write take that much longer, as on a slow filesystem. It is
read only here and does nothing when unset.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distft.engine import manifest, safe_load
from distft.errors import ConfigError, DistftError
from distft.runtime import dist

STATE_FILE = "trainer_state.json"
MANIFEST = manifest.MANIFEST
SLOW_SAVE_ENV = "DISTFT_FAULT_SLOW_SAVE_S"


class CheckpointError(DistftError):
    """A checkpoint could not be written (full disk, permissions) or fails its manifest."""


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def latest(run_dir: Path) -> Path | None:
    """The checkpoint checkpoints/latest names, if complete (no manifest check: see Checkpointer.resolve)."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def verify(path: Path, unverified: bool = False) -> str | None:
    """None when `path` is a complete checkpoint matching its manifest, else what is wrong. A
    checkpoint without a manifest is refused unless `unverified` (resume_unverified=true). A
    collective when ranks are joined (each hashes its share of the files)."""
    return manifest.verify(path, STATE_FILE, unverified)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


# ------------------------------------------------------------------ resume
def _complete_steps(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=_step_of, reverse=True)


def _restarted() -> bool:
    """An elastic or SLURM restart of the same job (it started this run dir itself)."""
    counts = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in counts)


def _candidates(resume: str, run_dir: Path) -> tuple[str | None, list[Path], str | None]:
    """(error, checkpoints to try in order, a message for the first that passes). Cheap: no hashing."""
    if resume == "never":
        held = [p.name for p in _complete_steps(run_dir) if (p / STATE_FILE).is_file()]
        if not held or _restarted():
            return None, [], None
        error = (
            f"resume=never: output_dir={run_dir} holds another run's checkpoints ({', '.join(held[:3])}); "
            "a fresh start there would prune them and mix two runs in metrics.jsonl. Start the new "
            "run in a new output_dir, or continue that run with resume=auto"
        )
        return error, [], None
    if resume != "auto":
        path = Path(resume)
        if not (path / "checkpoints").is_dir():
            return None, [path], None
        run_dir = path  # a run dir: its latest, checked like resume=auto
    candidates = _complete_steps(run_dir)
    if not (checkpoints_dir(run_dir) / "latest").is_file():
        if not candidates:
            return None, [], None  # nothing was ever completed here: a fresh start
        missing = checkpoints_dir(run_dir) / "latest"
        return None, candidates, f"{missing} is missing; resuming from the newest verified checkpoint"
    pointer = latest(run_dir)
    if pointer is not None:  # latest first, then older complete ones (never newer: they were not finished)
        candidates = [pointer] + [p for p in candidates if _step_of(p) < _step_of(pointer)]
    return None, candidates, None


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


# ------------------------------------------------------------------ the run's checkpointer
def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


@dataclass
class _Pending:
    handle: object  # a Future (or torch's AsyncSaveResponse) of the strategy's background write
    tmp: Path
    final: Path
    state: dict


@dataclass
class Checkpointer:
    """Saves, seals and finds the checkpoints of one run dir; holds the pending async save."""

    run_dir: Path
    info: object  # distft.runtime.dist.DistInfo
    keep_last: int = 1
    async_save: bool = False
    pending: _Pending | None = None
    resolved: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return checkpoints_dir(self.run_dir)

    # -------------------------------------------------------------- resume
    def resolve(self, resume: str, unverified: bool = False) -> Path | None:
        """The checkpoint to resume from, verified against its manifest by all ranks together.
        resume=auto falls back to the previous complete checkpoint when the latest one fails (and
        says so). A collective."""
        key = (str(resume), bool(unverified))
        if key in self.resolved:
            return self.resolved[key]
        plan = _candidates(str(resume), self.run_dir) if self.info.is_main else None
        error, candidates, message = dist.broadcast_object(plan)
        messages = [message] if message else []
        refused: list[str] = []
        path = None
        for candidate in candidates:
            problem = verify(candidate, unverified)  # every rank, its share of the files
            if problem is None:
                path = candidate
                break
            refused.append(f"checkpoint {candidate.name} refused: {problem}")
        explicit = resume not in ("auto", "never") and not (Path(resume) / "checkpoints").is_dir()
        if explicit and refused:
            error = f"resume={resume!r} refused: {refused[0].split(' refused: ', 1)[1]}"
        elif refused and path is None:
            error = f"no usable checkpoint in {candidates[0].parent}: {'; '.join(refused)}"
            error += " (resume=never in a new output_dir starts over)"
        if error:
            raise CheckpointError(error) if resume == "auto" else ConfigError(error)
        if path is not None and self.info.is_main:
            if messages:
                messages[0] += f" {path.name}"
            messages += refused
            if refused:
                messages.append(f"falling back to the previous complete checkpoint {path}")
            for line in messages:
                print(f"distft: {line}", flush=True)
        self.resolved[key] = path
        return path

    # -------------------------------------------------------------- save
    def save(self, strategy, step: int, trainer_state: dict, extra=None) -> Path:
        """Write step_N atomically on every rank. With async_save and a strategy that has
        `save_async`, returns once the state is staged; it becomes `latest` in wait_pending()."""
        self.wait_pending()  # the previous async save must be complete before the next one starts
        info, root = self.info, self.root
        final = root / f"step_{step}"
        tmp = root / f"step_{step}.tmp"
        if info.is_main:
            for stale in root.glob("step_*.tmp"):  # left by a crashed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = {**trainer_state, "checkpoint_format": strategy.checkpoint_format}
        handle, error = None, None
        try:
            if self.async_save and strategy.async_save:
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
            self.pending = _Pending(handle, tmp, final, state)
            return final
        self._finish(tmp, final, state, error)
        return final

    def wait_pending(self) -> None:
        """Wait for the background checkpoint write (if any), then make it complete and `latest`."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        error = None
        try:
            getattr(pending.handle, "upload_completion", pending.handle).result()
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = e
        self._finish(pending.tmp, pending.final, pending.state, error)

    def _finish(self, tmp: Path, final: Path, state: dict, error) -> None:
        """Every rank wrote its part (or failed): agree, hash together, rank 0 publishes step_N."""
        info, root = self.info, self.root
        previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
        if error is None and info.is_main:  # before the agreement: every rank then sees every file
            try:
                (tmp / STATE_FILE).write_text(json.dumps({**state, "sealed_at": time.time()}, indent=2))
            except OSError as e:
                error = e
        (failed,) = dist.all_reduce_sum([1.0 if error is not None else 0.0], info.device)
        if not failed:
            problem = manifest.write(tmp)  # each rank hashes its share; no rank waits alone
            if problem:
                error = CheckpointError(problem)
        if not failed and error is None and info.is_main:
            try:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _write_pointer(root, final.name)
                _prune(root, self.keep_last)
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

    def mark_best(self, step: int) -> None:
        """Point checkpoints/best at step_<step> (complete on every rank); pruning keeps it."""
        self.wait_pending()
        if self.info.is_main:
            tmp = self.root / f".best.tmp{os.getpid()}"
            tmp.write_text(f"step_{step}\n")
            os.replace(tmp, self.root / "best")
        dist.barrier()


def _slowed(handle, seconds: float) -> Future:
    """`handle`'s write, completing `seconds` later, in the background (fault injection)."""

    def write() -> None:
        time.sleep(seconds)
        getattr(handle, "upload_completion", handle).result()

    return ThreadPoolExecutor(1, thread_name_prefix="distft-slow-save").submit(write)


def _one_line(error: BaseException) -> str:
    """The innermost cause's last line (DCP's exception carries every rank's whole traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


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
    mine = strategy.checkpoint_format
    if saved and mine and saved != mine:
        raise ConfigError(
            f"resume: {path} was written by strategy={state.get('strategy')} ({saved} format); "
            f"strategy={strategy_name} reads {mine} checkpoints only. Resume with a strategy of the "
            f"saved family, or start over from its weights: resume=never "
            f"model.name_or_path=<the run's export/ directory>"
        )
