"""Resume that checks what it resumes (issue 12 points 1-4, issue 19 points 5 and 7), on real
processes: a changed config is refused or noted before any model is built, a missing `latest` is
recovered, a second run into a busy run dir is refused, a checkpoint without a manifest or with a
pickle payload is refused, device RNG is this rank's own."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.util import REPO, env, metrics, train, train_losses

SMALL = [
    "train.lr_scheduler=constant",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "eval.test=false",
    "train.export=none",
    "model.num_layers=1",
    "data.num_examples=120",
    "train.micro_batch_size=4",
]


def _error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("distft: error:")]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One process, 2 steps, checkpoints at 1 and 2."""
    run = tmp_path_factory.mktemp("resume") / "base"
    train(run, *SMALL, "train.max_steps=2", "train.save_every=1", plain=True)
    return run


def _copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


@pytest.mark.slow
def test_changed_model_or_tuning_is_refused_before_anything_is_built(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    proc = train(
        run, *SMALL, "train.max_steps=3", "model.hidden_size=256", "tuning=lora", plain=True, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert "model.hidden_size: 128 → 256" in line and "tuning.name: full → lora" in line, line
    assert "output_dir=<new dir>" in line and "resume=never model.name_or_path=" in line
    assert "Traceback" not in proc.stderr
    assert (run / "config.yaml").read_text() == config  # not overwritten by a refused run
    assert json.loads((run / "base_model" / "config.json").read_text())["hidden_size"] == 128
    assert max(train_losses(run)) == 2  # nothing trained


@pytest.mark.slow
def test_changed_lr_steps_and_data_resume_with_a_note(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    old_config = (run / "config.yaml").read_text()
    proc = train(run, *SMALL, "train.max_steps=3", "train.lr=5e-4", "data.num_examples=130", plain=True)
    out = proc.stdout
    assert "resumed step_2 with changed settings" in out, out[-3000:]
    for key in ("train.lr: 0.003 → 0.0005", "train.max_steps: 2 → 3", "data.num_examples: 120 → 130"):
        assert key in out and key in (run / "notes.txt").read_text(), key
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert (run / "config_history" / "1.yaml").read_text() == old_config
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
    state = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    fp = state["fingerprint"]
    assert fp["model"]["hidden_size"] == 128 and fp["tuning"]["name"] == "full"
    assert fp["params"]["model.embed_tokens.weight"] == [102, 128]


@pytest.mark.quick
def test_tiny_base_model_is_rebuilt_when_model_keys_change(tmp_path):
    from distft.config.schema import ModelConfig
    from distft.models.tiny import build_tiny

    path = tmp_path / "base_model"
    build_tiny(path, ModelConfig(num_layers=1))
    build_tiny(path, ModelConfig(num_layers=1, hidden_size=64, intermediate_size=96))
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["intermediate_size"] == 96
    build_tiny(path, ModelConfig(num_layers=1, hidden_size=64, intermediate_size=96, init_seed=7))
    assert json.loads((path / "distft_tiny.json").read_text())["init_seed"] == 7
    assert not list(tmp_path.glob("base_model.*"))


@pytest.mark.slow
def test_missing_latest_resumes_from_newest_step_and_never_overwrites(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    (run / "checkpoints" / "latest").unlink()
    proc = train(run, *SMALL, "train.max_steps=3", "train.save_every=1", "train.keep_last=5", plain=True)
    assert "latest is missing; resuming from the newest verified checkpoint step_2" in proc.stdout
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3], steps  # one run: step 3 after 1, 2 (not a second run from step 1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1", "step_2", "step_3"]
    # resume=never into a run dir holding checkpoints: refused, nothing pruned or appended.
    before = (run / "metrics.jsonl").read_text()
    proc = train(run, *SMALL, "train.max_steps=3", "resume=never", plain=True, check=False)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "holds another run's checkpoints (step_3, step_2, step_1)" in line and "new output_dir" in line
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints" / "step_1").is_dir()


@pytest.mark.slow
def test_second_run_into_a_busy_run_dir_is_refused(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "distft.train", "train.progress=false", *SMALL, f"output_dir={run}"]
    # The first run stalls before step 3 (fault injection) while it holds the run dir.
    first = subprocess.Popen(
        [*cmd, "train.max_steps=4"], cwd=REPO, env=env(DISTFT_FAULT_SLEEP="3:120"), start_new_session=True
    )
    try:
        lock = run / ".lock"
        end = time.time() + 300
        while time.time() < end and first.poll() is None:
            if lock.is_file() and f'"pid": {first.pid}' in lock.read_text():
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        second = train(run, *SMALL, "train.max_steps=4", plain=True, check=False)
        assert second.returncode == 2
        (line,) = _error_lines(second)
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in line, line
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    # kill -9 freed the lock: the next run dir user gets it.
    from distft.engine import runlock

    assert runlock._try_lock(run) is None
    runlock.release(run)


@pytest.mark.slow
def test_checkpoint_without_manifest_is_refused(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    step2 = run / "checkpoints" / "step_2"
    (step2 / "manifest.json").unlink()
    shard = next((step2 / "dcp").glob("__0_*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flipped bytes nobody can detect without the manifest
    shard.write_bytes(bytes(raw))
    proc = train(tmp_path / "new", *SMALL, "train.max_steps=3", f"resume={step2}", plain=True, check=False)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "has no manifest.json" in line and "resume_unverified=true" in line, line
    # resume=auto takes the same path through verify and falls back (test_trust covers the fallback).
    from distft.engine.checkpoint import verify

    assert "has no manifest.json" in verify(step2)
    assert verify(step2, unverified=True) is None  # resume_unverified=true


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.quick
def test_deepspeed_and_dcp_loads_cannot_run_code(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from distft.engine import safe_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _Payload(marker)}, evil)
    with safe_load.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        TorchCheckpointEngine().load(str(evil))  # DeepSpeed's own loader (weights_only=False)
    assert not marker.exists()
    assert os.environ.get(safe_load.FORCE) is None  # restored after the block
    # DCP's .metadata (plain pickle.load in torch): refused before DCP reads it.
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    problem = safe_load.check_dcp_metadata(dcp)
    assert "could run code" in problem and not marker.exists()


@pytest.mark.quick
def test_rng_restores_this_ranks_device_only():
    """Issue 19.7: a checkpoint from 4 visible GPUs restored where a rank sees one (CUDA_VISIBLE_DEVICES
    per rank), through the device-RNG path (an accelerator module with one device)."""
    from distft.engine import checkpoint

    class OneDevice:  # the torch.cuda surface the checkpoint uses, with one visible device
        def __init__(self):
            self.state = {0: torch.tensor([0], dtype=torch.uint8)}

        def get_rng_state(self, device):
            return self.state[device.index or 0].clone()

        def set_rng_state(self, state, device):
            index = device.index or 0
            if index not in self.state:
                raise RuntimeError(f"invalid device ordinal {index}")
            self.state[index] = state.clone()

        def current_device(self):
            return 0

    dev, rng = torch.device("cuda", 0), OneDevice()
    saved = checkpoint._rng_state(dev, rng)
    assert set(saved) == {"python", "torch", "device"}  # one device state, not a list of all
    rng.state[0] = torch.tensor([9], dtype=torch.uint8)
    checkpoint._set_rng_state(saved, dev, rng)
    assert rng.state[0].item() == 0
    old_format = {**saved, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in (5, 6, 7, 8)]}
    del old_format["device"]
    checkpoint._set_rng_state(old_format, torch.device("cuda", 0), rng)  # 4 saved, 1 visible
    assert rng.state[0].item() == 5


class _ShardWriter:
    """A strategy's save as DCP does it: one shard file per rank (1 MiB here)."""

    checkpoint_format = "dcp"

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, path: Path) -> None:
        (path / f"shard_{self.rank}.bin").write_bytes(bytes([self.rank]) * (1 << 20))


def _hash_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DISTFT_FAULT_SLOW_HASH_S="2")
    # 7 s timeout: hashing the 5 files alone (10 s) on rank 0 would time rank 1 out.
    timeout = datetime.timedelta(seconds=7)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    from distft.engine.checkpoint import Checkpointer
    from distft.runtime.dist import DistInfo

    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    result = {}
    try:
        ckpt = Checkpointer(Path(run_dir), info, keep_last=2)
        ckpt.save(_ShardWriter(rank), 1, {"step": 1})
        result["resolved"] = str(Checkpointer(Path(run_dir), info).resolve("auto"))  # a restart
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_hashing_with_a_short_collective_timeout(tmp_path):
    """Issue 19.5: with every file slow to read back (2 s) and a 7 s process-group timeout, the
    save's manifest and the restart's verification finish: each rank hashes its share."""
    import torch.multiprocessing as mp

    from tests.util import free_port

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    mp.start_processes(
        _hash_worker, args=(2, free_port(), str(run), str(out)), nprocs=2, start_method="spawn"
    )
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("error" not in r for r in results), results
    step = run / "checkpoints" / "step_1"
    assert results[0]["resolved"] == results[1]["resolved"] == str(step)
    files = json.loads((step / "manifest.json").read_text())["files"]
    names = ["rng_rank0.pt", "rng_rank1.pt", "shard_0.bin", "shard_1.bin", "trainer_state.json"]
    assert sorted(files) == names
    from distft.engine import manifest

    shares = [manifest.share({n: f["size"] for n, f in files.items()}, r, 2) for r in range(2)]
    assert (
        sorted(shares[0] + shares[1]) == names and "shard_0.bin" in shares[0] and "shard_1.bin" in shares[1]
    )
    assert manifest.verify(step, "trainer_state.json") is None


@pytest.mark.quick
def test_fingerprint_sorts_changes_into_refused_and_noted():
    from distft.config.load import load_config
    from distft.engine import fingerprint

    saved = fingerprint.of_config(load_config(["model.num_layers=1"])[0])
    for overrides, blocking in [
        (["model.num_layers=2"], ["model.num_layers: 1 → 2"]),
        (["tuning=lora"], ["tuning.name: full → lora"]),  # not each of lora's keys
        (["method=dpo"], ["method.name: sft → dpo"]),
        (["tuning.freeze=[embed_tokens]"], ["tuning.freeze: [] → ['embed_tokens']"]),
        (["model.init_seed=7"], ["model.init_seed: 1234 → 7"]),
    ]:
        mine = fingerprint.of_config(load_config(["model.num_layers=1", *overrides])[0])
        assert fingerprint.differences(saved, mine)[0] == blocking, overrides
    mine = fingerprint.of_config(
        load_config(["model.num_layers=1", "train.lr=1e-4", "data.max_length=32"])[0]
    )
    assert fingerprint.differences(saved, mine) == (
        [],
        ["data.max_length: 64 → 32", "train.lr: 0.003 → 0.0001"],
    )
    runtime = ["model.num_layers=1", "model.attn_implementation=eager", "tuning.merge_on_export=true"]
    assert fingerprint.differences(saved, fingerprint.of_config(load_config(runtime)[0])) == ([], [])
