"""Shared test helpers: start real ranks (torchrun / plain process) and read a run dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for tests; a test's own overrides come after and win.
FAST = [
    "train.progress=false",
    "data.num_examples=400",
    "data.max_eval_generations=8",
    "train.max_new_tokens=6",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"})
    e.update(extra)
    return e


def train(
    run_dir: Path,
    *overrides: str,
    nproc: int = 2,
    check: bool = True,
    timeout: int = 600,
    extra_env: dict | None = None,
    plain: bool = False,
) -> subprocess.CompletedProcess:
    """Run `distft.train` on `nproc` real ranks (torchrun, gloo), or as one plain process."""
    args = [*FAST, f"output_dir={run_dir}", *overrides]
    if plain:
        cmd = [sys.executable, "-m", "distft.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "distft.train",
            *args,
        ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def exported_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "export" / "model.safetensors"))


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over all tensors, relative to the largest |a|."""
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    return diff / scale


def reload_exports(exports: list[tuple[Path, Path]]) -> dict[str, dict]:
    """(export dir, dir holding its distft_export.json) pairs loaded in one fresh, offline process
    (tests/reload_export.py): per export dir, its logits' max_diff / rel_diff from the recorded
    trained logits, plus adapter facts."""
    pairs = [[str(e), str(m)] for e, m in exports]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "reload_export.py"), json.dumps(pairs)],
        cwd=REPO,
        env=env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
