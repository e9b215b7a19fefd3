"""Tokens/s of tensor parallelism against data parallelism on the same 2 ranks and global batch:
`strategy=fsdp strategy.tp=2` (one replica, every rank holds half of each projection, an
all-reduce after attention and MLP) vs `strategy=fsdp` (dp=2, each rank half of the batch).

Both runs do the same work (the same global batches of the same examples), so the ratio of their
steady-state step times is the throughput ratio; it is taken per pair of runs started back to
back (order alternating), as the machine is shared. tokens/s is the dp run's logged metric.

    .venv/bin/python bench/tensor_parallel.py [--repeats 3] [--steps 40] [--global-batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import REPO, bench_env, free_port, load_average, metrics, spread

OUT = REPO / "outputs" / "bench" / "tensor_parallel"


def step_seconds(run_dir: Path) -> float:
    """Median wall time between logged steps after the first 20% (warm-up, first all-gathers)."""
    t = [r["time"] for r in metrics(run_dir) if "loss" in r]
    gaps = [b - a for a, b in zip(t, t[1:])][len(t) // 5 :]
    return statistics.median(gaps)


def run(name: str, overrides: list[str], steps: int, rep: int) -> dict:
    import subprocess
    import sys

    run_dir = OUT / f"{name}_{rep}"
    args = [
        "strategy=fsdp",
        "train.precision=fp32",
        f"train.max_steps={steps}",
        "train.progress=false",
        "train.eval_every=0",
        "train.eval_generate=false",
        "data.max_eval_generations=0",
        "data.splits=[1,0,0]",
        "data.num_examples=2000",
        "train.export=none",
        "eval.test=false",
        "cluster.preflight=false",
        "logger=none",
        "resume=never",
        f"output_dir={run_dir}",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "-m", "distft.train", *args]
    load = load_average()
    log = OUT / f"{name}_{rep}.log"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=bench_env(), stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"{name} failed ({rc}); see {log}")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    return {"step_s": step_seconds(run_dir), "tokens_per_s": rows[-1]["tokens_per_s"], "load": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=16)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    g = a.global_batch
    jobs = {"dp2": [f"train.micro_batch_size={g // 2}"]}
    jobs["tp2"] = ["strategy.tp=2", f"train.micro_batch_size={g}"]
    res: dict[str, list[dict]] = {k: [] for k in jobs}
    ratios = []
    for rep in range(a.repeats):
        order = list(jobs) if rep % 2 == 0 else list(jobs)[::-1]
        for name in order:
            res[name].append(run(name, jobs[name], a.steps, rep))
        ratios.append(res["dp2"][-1]["step_s"] / res["tp2"][-1]["step_s"])  # tp tokens/s ÷ dp tokens/s
    loads = [r["load"] for v in res.values() for r in v]
    dp_step, tp_step = (spread([r["step_s"] for r in res[k]]) for k in ("dp2", "tp2"))
    lines = [
        f"global batch {g}, {a.steps} steps, 2 ranks, fsdp fp32, tiny Llama; {a.repeats} pairs; "
        f"1-min load average {min(loads):.1f}-{max(loads):.1f} on 2 cores",
        "",
        "| job | step s (min / median / max) | tokens/s (dp: logged) |",
        "|---|---|---|",
        f"| dp=2 | {dp_step} | {spread([r['tokens_per_s'] for r in res['dp2']])} |",
        f"| tp=2 | {tp_step} | - |",
        "",
        f"tokens/s of tp=2 ÷ dp=2 per pair (min / median / max): {spread(ratios)}",
    ]
    text = "\n".join(lines)
    print(text)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps({"runs": res, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
