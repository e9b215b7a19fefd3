"""Before training: who is in the job and how fast its collectives are; during training: stack
dumps of every rank when it hangs or crashes.

- `run` (every rank, once, right after the process group exists): rank 0 prints and writes
  `preflight.json`: world size, backend, each rank's host/device/pid, all-reduce latency
  (1 float) and bus bandwidth (256 MiB on GPU: large enough that the time is bandwidth, not
  latency, as nccl-tests' large sizes; 4 MiB on CPU, where gloo is slow and the report is a sanity
  check).
- Hang watchdog: also names ranks on this host that are stopped (SIGSTOP), which the others
  wait for in a collective.
- Stacks: each rank appends to `<run dir>/stacks/rank<N>.txt` when no step finishes within
  `cluster.hang_dump_s` (a watchdog thread; `kick()` once per step), on a fatal signal
  (segfault, abort, by faulthandler), and on demand with `kill -USR2 <rank pid>` (pids are in
  the report).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from distft.runtime import dist, stop

DUMP_SIGNAL = signal.SIGUSR2
_dump_file = None
_hang_s = 0.0
_last_kick = 0.0
_peers: list[dict] = []  # the other ranks' rank/host/pid, from the pre-flight gather


def run(cfg, info: dist.DistInfo, run_dir: Path) -> dict:
    stop.install(cfg.cluster.stop_grace_s, dump_stacks)
    arm_stack_dumps(run_dir, info.rank, cfg.cluster.hang_dump_s)
    me = {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "host": socket.gethostname(),
        "device": str(info.device),
        "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }
    ranks = dist.all_gather_objects(me)
    _peers[:] = [r for r in ranks if r["rank"] != info.rank]  # the hang watchdog checks on them
    if not cfg.cluster.preflight:
        return {}
    report = {
        "world_size": info.world_size,
        "nodes": len({r["host"] for r in ranks}),
        "backend": info.backend if dist.active() else "none (single process)",
        "torch": torch.__version__,
        "ranks": ranks,
        **measure_all_reduce(info),
    }
    if info.is_main:
        (run_dir / "preflight.json").write_text(json.dumps(report, indent=2))
        print(format_report(report), flush=True)
    return report


def _timed(t: torch.Tensor, iters: int, device: torch.device) -> list[float]:
    import torch.distributed as tdist

    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tdist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


BANDWIDTH_MIB = {"cuda": 256.0, "cpu": 4.0}


def bandwidth_mib(device: torch.device) -> float:
    """Bytes for the bandwidth all-reduce: a 4 MiB all-reduce on NVLink/InfiniBand takes tens of
    microseconds, mostly latency; 256 MiB is in the range where bus bandwidth plateaus."""
    return BANDWIDTH_MIB.get(device.type, BANDWIDTH_MIB["cuda"])


def measure_all_reduce(info: dist.DistInfo, size_mb: float | None = None, iters: int = 5) -> dict:
    """Median all-reduce latency (one float) and bus bandwidth (size_mb of float32; by default
    bandwidth_mib of the device), as nccl-tests define it: busbw = bytes / time × 2(n-1)/n."""
    if not dist.active():
        return {}
    size_mb = bandwidth_mib(info.device) if size_mb is None else size_mb
    small = torch.zeros(1, device=info.device)
    _timed(small, 3, info.device)  # warm-up: connections, allocator
    latency = statistics.median(_timed(small, 20, info.device))
    n = int(size_mb * 2**20 / 4)
    big = torch.ones(n, dtype=torch.float32, device=info.device)
    _timed(big, 1, info.device)
    t = statistics.median(_timed(big, iters, info.device))
    # Ranks' clocks differ: take the slowest rank's view, as the slowest rank bounds the job.
    latency, t = (-x for x in _all_min([-latency, -t], info.device))
    nbytes = n * 4
    algbw = nbytes / t
    busbw = algbw * 2 * (info.world_size - 1) / info.world_size
    return {
        "all_reduce_latency_us": latency * 1e6,
        "all_reduce_bytes": nbytes,
        "all_reduce_time_ms": t * 1e3,
        "all_reduce_algbw_gbps": algbw / 1e9,
        "all_reduce_busbw_gbps": busbw / 1e9,
    }


def _all_min(values: list[float], device) -> list[float]:
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return t.tolist()


def format_report(r: dict) -> str:
    lines = [
        "distft preflight",
        f"  world size  : {r['world_size']} ranks on {r['nodes']} node(s), backend {r['backend']}",
    ]
    for x in r["ranks"]:
        lines.append(
            f"  rank {x['rank']:<6} : {x['host']} local {x['local_rank']} {x['device']} "
            f"({x['device_name']}, {x['threads']} threads) pid {x['pid']}"
        )
    if "all_reduce_latency_us" in r:
        lines.append(f"  all-reduce  : latency {r['all_reduce_latency_us']:.0f} us (1 float)")
        lines.append(
            f"  all-reduce  : {r['all_reduce_bytes'] / 2**20:.0f} MiB in {r['all_reduce_time_ms']:.2f} ms, "
            f"bus bandwidth {r['all_reduce_busbw_gbps']:.2f} GB/s"
        )
    return "\n".join(lines)


def arm_stack_dumps(run_dir: Path, rank: int, hang_s: float) -> Path:
    """Route this rank's stack dumps (hang watchdog, fatal signal, SIGUSR2) to stacks/rank<N>.txt."""
    global _dump_file, _hang_s, _last_kick
    path = run_dir / "stacks" / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if _dump_file is None or _dump_file.name != str(path):
        _dump_file = open(path, "a", buffering=1)  # kept open: faulthandler writes to its fd
    faulthandler.enable(file=_dump_file, all_threads=True)
    try:
        faulthandler.register(DUMP_SIGNAL, file=_dump_file, all_threads=True, chain=False)
    except (ValueError, RuntimeError):
        pass
    _hang_s = hang_s
    _last_kick = time.monotonic()
    if hang_s > 0 and not any(t.name == "distft-hang-watchdog" for t in threading.enumerate()):
        threading.Thread(target=_watch, name="distft-hang-watchdog", daemon=True).start()
    return path


def kick() -> None:
    """Once per step: the step finished (a dump only when no step ends within hang_dump_s)."""
    global _last_kick
    _last_kick = time.monotonic()


def _watch() -> None:
    """Dump every thread's stack once per stall of hang_dump_s without a finished step.

    A Python thread, not faulthandler's timer: faulthandler reads other threads' frames without
    the GIL and can crash a rank that is busy (seen: SIGSEGV while plotting the report). A rank
    stuck in a collective waits with the GIL released, so this thread still runs and reads stable
    frames."""
    dumped_for = None
    told: set[str] = set()
    while _hang_s > 0:
        time.sleep(min(1.0, _hang_s / 4))
        since, stalled = _last_kick, time.monotonic() - _last_kick
        if _hang_s <= 0 or stalled < _hang_s:
            told.clear()
            continue
        fresh = [line for line in stopped_peers() if line not in told]
        for line in fresh:  # checked on every tick of a stall: a rank may be stopped at any time
            print(f"distft: {line}", file=sys.stderr, flush=True)
        told.update(fresh)
        if dumped_for != since or fresh:
            dumped_for = since
            title = f"Timeout: no step finished for {stalled:.0f} s (cluster.hang_dump_s={_hang_s})"
            dump_stacks("\n".join([title, *fresh]))


def stopped_peers() -> list[str]:
    """Ranks on this host that are stopped (SIGSTOP, Ctrl-Z, a debugger): the others wait for
    them in a collective until cluster.timeout_s. Ranks on other hosts cannot be seen from here;
    their own node's ranks report them."""
    host = socket.gethostname()
    found = []
    for peer in _peers:
        if peer["host"] != host:
            continue
        try:
            state = Path(f"/proc/{peer['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("T", "t"):
            found.append(
                f"rank {peer['rank']} (pid {peer['pid']} on {host}) is stopped (state {state}: SIGSTOP, "
                f"Ctrl-Z or a debugger); the other ranks wait for it. `kill -CONT {peer['pid']}` resumes it."
            )
    return found


def dump_stacks(title: str) -> None:
    """Every other thread's Python stack into this rank's stacks file (stderr before it is armed)."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    out = [f"{title} at {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        out.append(f"Thread 0x{ident:016x} {names.get(ident, '')} (most recent call first):")
        out += [line.rstrip("\n") for line in reversed(traceback.format_stack(frame))]
        out.append("")
    try:
        (_dump_file or sys.stderr).write("\n".join(out) + "\n")
    except (OSError, ValueError):  # the run dir went away or the file closed at exit
        pass
