"""Start-up and wind-down costs of a job, checked without timing anything: the schedules equal
transformers' at every step, a plain job does not import what it does not use, the report's
plotting runs beside the export and is complete when the run ends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distft.engine.schedule import lr_factor
from tests.util import REPO

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 10), (3, 10), (10, 10), (5, 97)])
def test_lr_schedules_equal_transformers_at_every_step(name, warmup, total):
    import torch
    from transformers import get_scheduler

    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    w = 0 if name == "constant" else warmup
    want = get_scheduler(name, holder, num_warmup_steps=w, num_training_steps=total).lr_lambdas[0]
    for step in range(total + 2):
        assert lr_factor(name, step, w, total) == want(step), (name, step)  # bit for bit


def test_engine_and_schedule_import_no_peft_or_bitsandbytes():
    code = (
        "import sys\n"
        "from distft.engine.trainer import Trainer\n"
        "from distft.engine.schedule import lr_schedule\n"
        "from distft.config.load import load_config\n"
        "cfg, _ = load_config([])\n"
        "lr_schedule(cfg, 10)(3)\n"
        "print(sorted(m for m in ('peft', 'bitsandbytes', 'matplotlib', 'trl') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_fast_exit_keeps_what_the_interpreter_exit_guarantees(tmp_path):
    """exit_now: the exit code, atexit handlers, a non-daemon thread's work and a still-open
    file's buffered writes all survive; only the teardown is skipped. An executor's idle worker
    (GRPO's async rollouts keep one) does not hang the exit. Looking for open files touches no
    object that warns (torch.distributed.reduce_op does when its class is read)."""
    code = f"""
import atexit, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch.distributed
from distft.runtime.fast_exit import exit_now
d = {str(tmp_path)!r}
atexit.register(lambda: open(d + "/atexit", "w").write("ran"))
pool = ThreadPoolExecutor(1)
pool.submit(int).result()  # its worker, still referenced, waits for work: never shut down
f = open(d + "/buffered", "w")
f.write("not flushed yet")
threading.Thread(target=lambda: (time.sleep(0.3), open(d + "/thread", "w").write("done"))).start()
print("stdout kept", end="")
exit_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == "stdout kept"
    assert "Warning" not in proc.stderr, proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "buffered").read_text() == "not flushed yet"
    assert (tmp_path / "thread").read_text() == "done"
