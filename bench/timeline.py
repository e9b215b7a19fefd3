"""Where a job's wall time goes before its first step and after its last: every phase, per rank.

    .venv/bin/python bench/timeline.py                                  # the default job, 2 ranks
    .venv/bin/python bench/timeline.py --overrides "train.epochs=1 strategy=zero2"
    .venv/bin/python bench/timeline.py --commit main     # that commit's code (git archive, as ab.py)
    .venv/bin/python bench/timeline.py --profile "strategy setup (zero)"   # cProfile one phase, rank 0

Each rank runs `distft.train` through this file (as bench/rss.py does), which wraps the engine's
phase functions (PHASES) with wall-clock stamps and writes them, with the import time of the stack
and the process's start and end, to <out>/timeline/rank<r>.json. Rank 0's phases are printed in
order with their seconds; "loop" is the first step's end to the last step's end.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

# (label, module, qualified name): the engine's phases, outermost first.
PHASES = [
    ("config", "distft.config.load", "load_config"),
    ("import engine", None, None),  # filled in: the time to import distft.engine.trainer
    ("dist init", "distft.runtime.dist", "init"),
    ("open run dir", "distft.engine.build", "open_run"),
    ("preflight", "distft.runtime.preflight", "run"),
    ("tiny base", "distft.models.loader", "resolve_model_path"),
    ("tokenizer", "distft.models.loader", "load_tokenizer"),
    ("data", "distft.data.pipeline", "prepare_cached"),
    ("model build", "distft.engine.build", "model"),
    ("mfu meter", "distft.engine.build", "mfu_meter"),
    ("strategy make", "distft.strategies.ddp", "make"),
    ("strategy setup", "distft.strategies.torch_native", "TorchNativeStrategy.setup"),
    ("strategy make (zero)", "distft.strategies.deepspeed_zero", "make"),
    ("strategy setup (zero)", "distft.strategies.deepspeed_zero", "DeepSpeedStrategy.setup"),
    ("lr schedule", "distft.engine.schedule", "lr_schedule"),
    ("run info", "distft.engine.run_info", "write"),
    ("metrics logger", "distft.engine.metrics", "MetricsLogger.__init__"),
    ("eval before", "distft.methods.sft", "SFT.evaluate"),
    ("train step", "distft.engine.trainer", "Trainer.train_step"),
    ("final eval", "distft.engine.trainer", "Trainer.eval_split"),
    ("finish", "distft.engine.finish", "finish"),
    ("checkpoint", "distft.engine.trainer", "Trainer.save"),
    ("export", "distft.engine.export", "export"),
    ("report", "distft.engine.finish", "write_report"),
    # Inside the loop, summed over the steps after the first ("loop shares"):
    ("forward + loss", "distft.methods.sft", "SFT.loss"),
    (
        "backward (DDP/FSDP: with gradient all-reduce)",
        "distft.strategies.torch_native",
        "TorchNativeStrategy.backward",
    ),
    ("optimizer step (clip + AdamW)", "distft.strategies.torch_native", "TorchNativeStrategy.step"),
    ("backward (ZeRO: with reduction)", "distft.strategies.deepspeed_zero", "DeepSpeedStrategy.backward"),
    ("optimizer step (ZeRO)", "distft.strategies.deepspeed_zero", "DeepSpeedStrategy.step"),
    ("collate", "distft.methods.sft", "SFT.collate"),
    ("loss/token all-reduce", "distft.runtime.dist", "all_reduce_sum"),
]
INNER = {
    label for label, _, _ in PHASES[PHASES.index(("forward + loss", "distft.methods.sft", "SFT.loss")) :]
}
# Libraries a plain full-tuning SFT job should not need to import (each costs seconds).
HEAVY = (
    "peft",
    "bitsandbytes",
    "deepspeed",
    "trl",
    "matplotlib",
    "matplotlib.pyplot",
    "datasets",
    "pandas",
    "sklearn",
)
STAMPS: list[tuple[str, float, float]] = []
T0 = time.time()


def _wrap(label: str, fn):
    profile = os.environ.get("TIMELINE_PROFILE") == label and os.environ.get("RANK", "0") == "0"

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.time()
        if profile:  # --profile LABEL: cProfile this phase on rank 0, top functions to profile.txt
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            STAMPS.append((label, start, time.time()))
            if profile:
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
                Path(os.environ["TIMELINE_DIR"]).mkdir(parents=True, exist_ok=True)
                (Path(os.environ["TIMELINE_DIR"]) / "profile.txt").write_text(text.getvalue())

    return timed


def install() -> None:
    start = time.time()
    import distft.engine.trainer  # noqa: F401  the stack's import, timed on its own

    STAMPS.append(("import engine", start, time.time()))
    for label, module, name in PHASES:
        if module is None:
            continue
        mod = importlib.import_module(module)
        owner, attr = (
            (mod, name) if "." not in name else (getattr(mod, name.split(".")[0]), name.split(".")[1])
        )
        setattr(owner, attr, _wrap(label, getattr(owner, attr)))
        for user in [
            m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("distft")
        ]:
            if owner is mod and getattr(user, attr, None) is getattr(owner, attr).__wrapped__:
                setattr(user, attr, getattr(owner, attr))  # `from x import f` copies


def _dump() -> None:
    out = Path(os.environ["TIMELINE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    heavy = [m for m in HEAVY if m in sys.modules]
    data = {"t0": T0, "end": time.time(), "stamps": STAMPS, "heavy_modules": heavy}
    (out / f"rank{rank}.json").write_text(json.dumps(data))


def table(path: Path, launched: float) -> str:
    """Rank 0's phases in order; train steps folded into the first step and the rest of the loop."""
    d = json.loads(path.read_text())
    stamps = sorted(d["stamps"], key=lambda s: s[1])
    steps = [s for s in stamps if s[0] == "train step"]
    rows = [("launch to interpreter", launched, d["t0"])]
    rows += [tuple(s) for s in stamps if s[0] != "train step" and s[0] not in INNER]
    if steps:
        rows.append(("first step", steps[0][1], steps[0][2]))
        rows.append((f"loop ({len(steps) - 1} more steps)", steps[0][2], steps[-1][2]))
    rows.sort(key=lambda r: r[1])
    lines = [f"{'phase':28s} {'start':>7s} {'seconds':>8s}"]
    for label, s, e in rows:
        lines.append(f"{label:28s} {s - launched:7.2f} {e - s:8.2f}")
    lines.append(f"{'exit':28s} {d['end'] - launched:7.2f}")
    lines.append(f"heavy modules imported on rank 0: {', '.join(d['heavy_modules']) or 'none'}")
    if steps:
        lines.append(
            f"before the first step: {steps[0][1] - launched:.2f} s; "
            f"after the last: {d['end'] - steps[-1][2]:.2f} s"
        )
    if len(steps) > 1:  # where the loop's time went: the inner phases within steps 2..N
        lo, hi = steps[0][2], steps[-1][2]
        loop = hi - lo
        lines.append(f"loop shares (steps 2..{len(steps)}, {loop:.2f} s):")
        inner = 0.0
        for label in [lb for lb, _, _ in PHASES if lb in INNER]:
            sec = sum(e - b for lb, b, e in stamps if lb == label and b >= lo and e <= hi)
            if sec:
                inner += sec
                lines.append(f"  {label:48s} {sec:8.2f} s {100 * sec / loop:5.1f}%")
        rest = loop - inner
        lines.append(
            f"  {'rest (sampler, logging, Python between)':48s} {rest:8.2f} s {100 * rest / loop:5.1f}%"
        )
    return "\n".join(lines)


def main() -> None:
    from common import REPO, bench_env, free_port, load_average

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--overrides", default="", help="distft overrides, space separated")
    p.add_argument("--out", default=str(REPO / "outputs/bench/timeline"))
    p.add_argument("--commit", default="", help="run this commit's distft (default: the working tree)")
    p.add_argument("--profile", default="", help="a phase label: cProfile it on rank 0 (profile.txt)")
    a = p.parse_args()
    import shutil
    import subprocess

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    args = [f"output_dir={out / 'run'}", "resume=never", "train.progress=false", *a.overrides.split()]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}",
        f"--master_port={free_port()}", __file__, "--rank-wrapper", "distft.train", *args,
    ]  # fmt: skip
    tree = REPO
    if a.commit:
        from ab import export

        tree = export(a.commit, REPO / "outputs/bench/ab/src")
    env = bench_env(TIMELINE_DIR=str(out / "timeline"), PYTHONPATH=str(tree), TIMELINE_PROFILE=a.profile)
    load = load_average()
    launched = time.time()
    out.mkdir(parents=True)
    with open(out / "run.log", "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - launched
    print(table(out / "timeline" / "rank0.json", launched))
    print(
        f"whole job {wall:.2f} s (rc {rc}); 1-minute load before {load:.1f}; "
        f"code {a.commit or 'working tree'}; overrides: {a.overrides}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-wrapper":
        module, args = sys.argv[2], sys.argv[3:]
        atexit.register(_dump)
        sys.argv = [module, *args]
        install()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        main()
