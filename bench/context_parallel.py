"""Per-rank peak memory of a 4k-token sequence with context parallelism (strategy.cp=2, Ulysses)
against none (cp=1), both FSDP2 on 2 ranks, SFT on one 4096-token example per row (generated
rows of random letters; no packing, so attention is plain causal), micro-batch 1, a tiny Llama
widened to 256 (4 layers, 8 heads) so activations, not the runtime, dominate.

    .venv/bin/python bench/context_parallel.py                 # ~5 min on 2 idle CPU cores
    .venv/bin/python bench/context_parallel.py --length 8192
    .venv/bin/python bench/context_parallel.py --styles ulysses,allgather,ring

cp=1: each rank trains on its own 4k row (dp=2); cp=2: both ranks share one row, 2k tokens each
(attention over the whole row for half the heads). `--styles` adds cp=2 runs with all-gather
and ring attention (whole-sequence keys and values on every rank vs blocks passed round).
Activation memory is peak RSS of the job minus
peak RSS of the same job on 128-token rows (the runtime baseline: Python, torch, model, data),
per rank; glibc's mmap threshold is pinned so freed blocks go back to the OS (see
bench/memory_scaling.py). Results: outputs/bench/context_parallel/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from common import REPO, bench_env, launch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument(
        "--shape",
        default="model.hidden_size=256 model.num_layers=4 model.num_heads=8 "
        "model.num_kv_heads=8 model.intermediate_size=768",
    )
    p.add_argument("--styles", default="ulysses", help="cp=2 attention styles: ulysses,allgather,ring")
    p.add_argument("--extra", default="", help="extra overrides for every run, space separated")
    p.add_argument("--out", default=str(REPO / "outputs/bench/context_parallel"))
    return p.parse_args()


def rows_file(path: Path, length: int, n: int = 24) -> Path:
    """`n` SFT rows of about `length` characters (the tiny model's tokens are characters)."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length - 40))
            f.write(json.dumps({"prompt": word + "=", "completion": word[:16]}) + "\n")
    return path


def run(a, cp: int, length: int, out: Path, style: str = "ulysses") -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    data = rows_file(out.parent / f"rows_{length}.jsonl", length)
    args = [
        f"output_dir={out}", "resume=never", "strategy=fsdp", f"strategy.cp={cp}",
        f"strategy.cp_style={style}", "train.precision=fp32",
        f"train.max_steps={a.steps}", "train.micro_batch_size=1", "data.packing=false",
        f"data.path=[{data}]", f"data.max_length={length}",
        f"model.max_position_embeddings={max(length, 256)}",
        "train.eval_every=0", "train.eval_generate=false", "data.max_eval_generations=0", "eval.test=false",
        "train.progress=false", "train.export=none", "logger=none", *a.shape.split(), *a.extra.split(),
    ]  # fmt: skip
    env = bench_env(MALLOC_MMAP_THRESHOLD_="65536")
    return launch("distft.train", args, 2, out / "rss", out / "run.log", env=env)["rss_gib"]


def main() -> None:
    a = parse()
    out = Path(a.out)
    peaks = {}
    for cp, style in [(1, "ulysses")] + [(2, st) for st in a.styles.split(",")]:
        key = "cp1" if cp == 1 else f"cp2_{style}"
        base = run(a, cp, 128, out / f"{key}_base", style)
        long = run(a, cp, a.length, out / f"{key}_long", style)
        peaks[key] = {"base_gib": base, "long_gib": long, "act_gib": [x - b for x, b in zip(long, base)]}
        print(f"{key}: peak RSS per rank {long} GiB, baseline {base} GiB", flush=True)
    act1, top1 = max(peaks["cp1"]["act_gib"]), max(peaks["cp1"]["long_gib"])
    result = {"length": a.length, "peaks": peaks}
    md = f"| {a.length}-token row, FSDP2, 2 ranks | activation memory per rank, GiB | ratio "
    md += "| peak RSS per rank, GiB | ratio |\n"
    md += "|---|---|---|---|---|\n"
    for key, p in peaks.items():
        act, top = max(p["act_gib"]), max(p["long_gib"])
        result[f"activation_ratio_{key}_over_cp1"] = act / act1
        md += f"| {key} | {act:.3f} | {act / act1:.2f} | {top:.3f} | {top / top1:.2f} |\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
