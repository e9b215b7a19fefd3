"""Helpers shared by the benchmarks: start ranks through the RSS wrapper, read what they left."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch(
    module: str, args: list[str], nproc: int, rss_dir: Path, log: Path, env: dict | None = None
) -> dict:
    """Run `module` on `nproc` ranks (torchrun, as distft-launch does, also for one rank) through
    bench/rss.py; returns the start time, wall time, per-rank peak RSS and per-rank CPU seconds."""
    wrapper = [str(BENCH / "rss.py"), module, *args]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", *wrapper,
    ]  # fmt: skip
    env = dict(env or bench_env())
    env["BENCH_RSS_DIR"] = str(rss_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{module} failed ({rc}); log {log}:\n{tail}")
    rss, cpu = read_rss(rss_dir, nproc), read_rss(rss_dir, nproc, "cpu_s")
    return {"t0": t0, "wall_s": wall, "rss_gib": rss, "cpu_s": cpu}


def read_rss(rss_dir: Path, nproc: int, key: str = "peak_rss_gib") -> list[float]:
    """Per rank: what bench/rss.py recorded at its exit (peak RSS in GiB, or `cpu_s`)."""
    out = []
    for r in range(nproc):
        p = rss_dir / f"rank{r}.json"
        out.append(json.loads(p.read_text()).get(key, float("nan")) if p.is_file() else float("nan"))
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def spread(values: list[float]) -> str:
    """min / median / max of repeated measurements."""
    v = [x for x in values if x == x]
    if not v:
        return "-"
    return f"{min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}"


def build_model_dir(path: Path, **shape) -> Path:
    """The tiny random-init Llama + character tokenizer (distft's default model) in `path`."""
    from distft.config.schema import ModelConfig
    from distft.models.tiny import build_tiny

    return build_tiny(path, ModelConfig(**shape))


def load_average() -> float:
    return os.getloadavg()[0]


def heldout_loss(model_dir: Path, tokenizer_dir: Path, rows: list[dict], batch: int = 8) -> float:
    """Mean next-token loss of a trained model on held-out prompt/completion rows, scored the way
    both sides train them (completion tokens and the EOS after them; TRL's `completion_only_loss`
    default for prompt/completion data, distft's `data.train_on_prompt=false`): one function, one
    tokenizer and one masking for every side, so the sides' losses compare."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["completion"]))  # batches of like lengths
    for i in range(0, len(rows), batch):
        ids, labels = [], []
        for r in rows[i : i + batch]:
            enc = tok(r["prompt"] + r["completion"], return_offsets_mapping=True)
            x = [*enc["input_ids"], tok.eos_token_id]
            scored = [a >= len(r["prompt"]) for a, _ in enc["offset_mapping"]] + [True]
            ids.append(x)
            labels.append([t if s else -100 for t, s in zip(x, scored)])
        width = max(map(len, ids))
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        ids_t = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        labels_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        with torch.no_grad():
            logits = model(input_ids=ids_t, attention_mask=mask, use_cache=False).logits
        flat = logits[:, :-1].reshape(-1, logits.size(-1))
        total += float(F.cross_entropy(flat, labels_t[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels_t[:, 1:] != -100).sum())
    return total / count


def time_forward_backward(sides: dict, repeats: int, zero_grad) -> tuple[dict, list[float]]:
    """Alternating forward + backward of each side's loss (`sides`: name -> a function returning
    it), `repeats` rounds after one warm-up round; per side its wall and CPU seconds and losses,
    and the 1-minute load at each timed run (bench/scored_head.py, bench/varlen_attention.py)."""
    res: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": [], "loss": []} for s in sides}
    load = []
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for side in sides if rep % 2 == 0 else reversed(list(sides)):
            zero_grad()
            w0, c0 = time.perf_counter(), time.process_time()
            loss = sides[side]()
            loss.backward()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if rep:
                res[side]["wall"].append(wall)
                res[side]["cpu"].append(cpu)
                res[side]["loss"].append(float(loss.detach()))
                load.append(load_average())
    return res, load


def print_timings(res: dict, after: str, before: str) -> None:
    """Each side's seconds and first loss, then the after/before ratios (`time_forward_backward`)."""
    for side, r in res.items():
        print(f"{side:7s} wall {spread(r['wall'])} s, CPU {spread(r['cpu'])} s, loss {r['loss'][0]:.6f}")
    for k in ("wall", "cpu"):
        ratios = [x / y for x, y in zip(res[after][k], res[before][k])]
        print(f"{after}/{before} {k}: {spread(ratios)}")
