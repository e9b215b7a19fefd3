"""Before/after speed of one distft job between two commits, alternating runs, repeated.

    .venv/bin/python bench/ab.py 11c1b3b 4341672                  # the default job, 1 epoch
    .venv/bin/python bench/ab.py HEAD~1 HEAD --overrides "strategy=fsdp"

Each commit is exported (git archive) to outputs/bench/ab/<commit> and run from there with the
same venv (PYTHONPATH points at the export). Reported: steady-state tokens/s (after the first 10%
of steps) of each run and the after/before ratio, min / median / max over the repeats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

from common import REPO, bench_env, launch, load_average, metrics, spread


def export(commit: str, root: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True)
    dest = root / sha.stdout.strip()
    if not dest.is_dir():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def steady_tokens_per_s(run_dir: Path) -> float:
    rows = [r for r in metrics(run_dir) if "loss" in r]
    rows = rows[len(rows) // 10 :]
    return statistics.median(r["tokens_per_s"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--overrides", default="", help="extra distft overrides, space separated")
    p.add_argument("--out", default=str(REPO / "outputs/bench/ab"))
    a = p.parse_args()
    out = Path(a.out)
    trees = {"before": export(a.before, out / "src"), "after": export(a.after, out / "src")}
    base = ["train.epochs=1", "train.eval_generate=false", "train.progress=false", "train.export=none"]
    res: dict[str, list[float]] = {"before": [], "after": []}
    for rep in range(a.repeats):
        for side in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            run = out / f"{side}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            env = bench_env(PYTHONPATH=str(trees[side]))
            args = [f"output_dir={run}", "resume=never", *base, *a.overrides.split()]
            load = load_average()
            launch("distft.train", args, a.nproc, run / "rss", run / "run.log", env=env)
            res[side].append(steady_tokens_per_s(run))
            print(f"[{rep}] {side:6s} {res[side][-1]:8.0f} tokens/s (load {load:.1f})", flush=True)
    ratios = [x / y for x, y in zip(res["after"], res["before"])]
    text = (
        f"{a.before} → {a.after}, {a.nproc} ranks, overrides: {a.overrides or '(default job)'}\n"
        f"before tokens/s {spread(res['before'])}; after {spread(res['after'])}; "
        f"after/before {spread(ratios)} (min / median / max over {a.repeats})\n"
    )
    (out / "results.json").write_text(json.dumps({"args": vars(a), **res, "ratios": ratios}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
