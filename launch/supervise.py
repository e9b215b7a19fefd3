"""Run a node's torchrun under the launcher so that a stop signal reaches the ranks and nothing
outlives the launcher.

- torchrun starts in its own session: Ctrl-C in a terminal reaches only the launcher, which
  passes SIGINT on once (not once per process of the group), so ranks stop through one path.
- SIGTERM, SIGINT, SIGHUP or SIGUSR1 to the launcher: forwarded to torchrun, which passes it to
  the ranks (`--signals-to-handle`); they agree at the next step end, checkpoint and exit 75.
  The launcher waits up to cluster.stop_grace_s (+ a margin), then kills what is left. A second
  signal kills the ranks at once.
- torchrun gets SIGTERM if the launcher dies (parent-death signal); the ranks, in turn, if
  torchrun dies (distft.runtime.stop).
- The ranks write how they ended into a folder the launcher names (DISTFT_RANK_STATUS_DIR): the
  launcher exits 75 when they stopped on request, and prints their `distft: error:` line last,
  after torchrun's messages.
- The launcher has imported torch already (validating the config needs it), so torchrun is a
  fork of the launcher running `launch.torchrun` rather than a new interpreter importing torch
  again: about a second off every job's start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from distft.runtime import stop

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
KILL_MARGIN_S = 30.0  # beyond stop_grace_s: torchrun's own shutdown timeout fires first


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in the group: in containers pid 1 may never reap orphans."""
    proc = Path("/proc")
    if not proc.is_dir():
        return _killpg(pgid, 0)
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _say(msg: str) -> None:
    print(f"distft-launch: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str], grace_s: float) -> int:
    """Start cmd (torchrun) in its own session, forward stop signals, wait, return the ranks' code."""
    status_dir = Path(tempfile.mkdtemp(prefix="distft-ranks-"))
    env = {**env, stop.STATUS_DIR_ENV: str(status_dir)}
    got: list[int] = []
    box: dict[str, subprocess.Popen] = {}

    def on_signal(signum: int, _frame) -> None:
        got.append(signum)
        proc = box.get("proc")
        if proc is None:
            return  # forwarded as soon as torchrun exists
        if len(got) == 1:
            if proc.poll() is None:
                os.kill(proc.pid, signum)
        elif len(got) == 2:
            _say(f"second {signal.Signals(signum).name}: killing the ranks now, without a checkpoint")
            _killpg(proc.pid, signal.SIGKILL)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if in_main else {}
    try:
        proc = _start(cmd, env)
        box["proc"] = proc
        if got:
            os.kill(proc.pid, got[0])
        rc = _wait(proc, got, grace_s)
        _reap_group(proc.pid, grace_s)
        return _outcome(rc, status_dir, got)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(status_dir, ignore_errors=True)


def _start(cmd: list[str], env: dict[str, str]):
    """torchrun in its own session with the parent-death signal: forked when cmd is this
    interpreter's `-m launch.torchrun` and the launcher has imported torch on one thread, else a
    new process."""
    forkable = cmd[:3] == [sys.executable, "-m", "launch.torchrun"] and "torch" in sys.modules
    if not forkable or threading.active_count() > 1 or not hasattr(os, "fork"):
        return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=stop.set_parent_death_signal)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: torchrun's agent, as `python -m launch.torchrun` would run it
        rc = 1
        try:
            os.setsid()
            stop.set_parent_death_signal()
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)  # not the launcher's forwarding handler
            os.environ.clear()
            os.environ.update(env)
            sys.argv = ["launch.torchrun", *cmd[3:]]
            from launch import torchrun

            rc = torchrun.main(cmd[3:])
        except SystemExit as e:  # as the interpreter maps it: None is 0, a message is 1
            rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001  said on stderr, as the interpreter would
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
    return _Forked(pid)


class _Forked:
    """The forked torchrun, with the part of Popen's interface the launcher uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired("torchrun", timeout)
            time.sleep(0.05)
        return self.returncode


def _wait(proc, got: list[int], grace_s: float) -> int:
    deadline = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if got and deadline is None:
            deadline = time.monotonic() + grace_s + KILL_MARGIN_S
        if deadline is not None and time.monotonic() > deadline:
            _say(f"the ranks did not stop within cluster.stop_grace_s={grace_s:.0f} s; killing them")
            _killpg(proc.pid, signal.SIGKILL)
            deadline = float("inf")


def _reap_group(pgid: int, grace_s: float) -> None:
    """torchrun is gone; ranks it left (it was killed) got SIGTERM from the parent-death signal and
    may be writing their stop checkpoint: give them the grace period, then kill them."""
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _group_alive(pgid) and _killpg(pgid, signal.SIGKILL):
        _say("killed ranks that were still running after torchrun ended")


def _outcome(rc: int, status_dir: Path, got: list[int]) -> int:
    ranks = []
    for path in sorted(status_dir.glob("rank*.json")):
        try:
            ranks.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    ranks.sort(key=lambda r: r.get("rank", 0))
    errors = list(dict.fromkeys(r["message"] for r in ranks if r.get("status") == "error"))
    if errors:
        # The ranks' own line, last: torchrun's failure report came before it.
        for line in errors:
            print(line, file=sys.stderr, flush=True)
        return 2
    if ranks and all(r.get("status") == "stopped" for r in ranks):
        return stop.EXIT_CODE
    if got and rc != 0:
        return 128 + got[0]
    return rc
