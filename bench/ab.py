"""Before/after speed of one distft job between two commits, alternating runs, repeated.

    .venv/bin/python bench/ab.py 11c1b3b 4341672                  # the default job, 1 epoch
    .venv/bin/python bench/ab.py HEAD~1 HEAD --overrides "strategy=fsdp"
    .venv/bin/python bench/ab.py HEAD~1 HEAD --whole-job --overrides "data.num_examples=400"
    .venv/bin/python bench/ab.py HEAD~1 HEAD --realistic 600      # bench/realistic.py's work, 600 rows

Each commit is exported (git archive) to outputs/bench/ab/<commit> and run from there with the
same venv (PYTHONPATH points at the export). Reported: steady-state tokens/s (after the first 10%
of steps), whole-job wall time (launch to exit) and time to the end of the first step of each run,
the CPU seconds of all ranks together (user + system, whole job: much less sensitive to the
machine's load than wall time), the median MFU of the steady-state steps, and the after/before
ratios, min / median / max over the repeats.
By default the job's evals, generation and export are off (the loop's speed); --whole-job keeps
the job's own defaults (evals before and after, export with its check, report), so the fixed
costs of a start and an end count.
--realistic ROWS runs bench/realistic.py's distft side instead (BPE tokenizer, 17M Llama, ROWS
log-normal prompt/completion rows, packing, evals off; the work built once under --out/work).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

from common import REPO, bench_env, launch, load_average, metrics, spread
from trl_compare import distft_stamps, steady


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


def median_mfu(run_dir: Path) -> float:
    """Median MFU (share of the calibrated matmul ceiling) of the steady-state steps; nan if unmetered."""
    rows = [r for r in metrics(run_dir) if "loss" in r]
    mfu = [r["mfu"] for r in rows[len(rows) // 10 :] if r.get("mfu")]
    return statistics.median(mfu) if mfu else float("nan")


def first_step_s(run_dir: Path, t0: float) -> float:
    """Launch to the end of the first optimizer step (its logged row's time)."""
    return steady(distft_stamps([r for r in metrics(run_dir) if "loss" in r]))[1] - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--overrides", default="", help="extra distft overrides, space separated")
    p.add_argument("--out", default=str(REPO / "outputs/bench/ab"))
    p.add_argument("--whole-job", action="store_true", help="keep the job's evals, export and report")
    p.add_argument("--realistic", type=int, default=0, metavar="ROWS", help="bench/realistic.py's work")
    a = p.parse_args()
    out = Path(a.out)
    trees = {"before": export(a.before, out / "src"), "after": export(a.after, out / "src")}
    base = ["train.epochs=1", "train.eval_generate=false", "train.progress=false", "train.export=none"]
    if a.whole_job:
        base = ["train.progress=false"]
    if a.realistic:
        import realistic

        ra = realistic.parse([f"--rows={a.realistic}", f"--nproc={a.nproc}"])
        work = realistic.prepare(ra, out / "work")
    keys = ("tokens_per_s", "wall_s", "first_step_s", "cpu_s", "mfu")
    res: dict[str, dict[str, list[float]]] = {side: {k: [] for k in keys} for side in ("before", "after")}
    loads: list[float] = []
    for rep in range(a.repeats):
        for side in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            run = out / f"{side}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            env = bench_env(PYTHONPATH=str(trees[side]))
            args = [f"output_dir={run}", "resume=never", *base, *a.overrides.split()]
            if a.realistic:
                args = [*realistic.distft_args(ra, work, run), *a.overrides.split()]
            load = load_average()
            loads.append(load)
            r = launch("distft.train", args, a.nproc, run / "rss", run / "run.log", env=env)
            got = {"tokens_per_s": steady_tokens_per_s(run), "wall_s": r["wall_s"]}
            got["first_step_s"] = first_step_s(run, r["t0"])
            got["cpu_s"] = sum(r["cpu_s"])  # all ranks' CPU seconds: far less load-dependent than wall time
            got["mfu"] = median_mfu(run)
            for k in keys:
                res[side][k].append(got[k])
            print(
                f"[{rep}] {side:6s} {got['tokens_per_s']:8.0f} tokens/s, whole job {got['wall_s']:6.1f} s, "
                f"first step {got['first_step_s']:5.1f} s, CPU {got['cpu_s']:6.1f} s, "
                f"MFU {100 * got['mfu']:4.1f}% (load {load:.1f})",
                flush=True,
            )
    ratios = {k: [x / y for x, y in zip(res["after"][k], res["before"][k])] for k in keys}
    lines = [
        f"{a.before} → {a.after}, {a.nproc} ranks, "
        f"{f'realistic {a.realistic} rows' if a.realistic else 'whole job' if a.whole_job else 'loop only'}, "
        f"overrides: {a.overrides or '(default job)'}; min / median / max over {a.repeats}; "
        f"1-minute load {spread(loads)}"
    ]
    for k in keys:
        lines.append(
            f"{k:13s} before {spread(res['before'][k])}; after {spread(res['after'][k])}; "
            f"after/before {spread(ratios[k])}"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(a), **res, "ratios": ratios}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
