"""`distft-verify [options] [overrides]`: the user's config, shrunk (fewer layers for the tiny
model, few steps, little data; same model, strategy, tuning, method and precision), through the
equivalence checks, each by real runs (torchrun subprocesses) in a work dir:

  grad accum      2 ranks × micro m/2 × accum 2  vs  2 ranks × micro m        (same global batch)
  world size      1 rank × micro m × accum 2     vs  2 ranks × micro m        (same global batch)
  resume          stopped at step k, resumed      vs  uninterrupted
  packing         the same examples packed vs one per row: loss per token
  cp              strategy.cp=2 (2 ranks × micro m × accum 2, dp=1) vs 2 ranks × micro m (fsdp/hsdp)
  EOS trained     greedy generation from export/ on training prompts ends with EOS
  export          export/ not empty, loadable, reproduces the trained model's logits
  tensor parallel 2 ranks × tp=2 vs the reference's tp (same global batch; strategy=fsdp; on by
                  default when strategy.tp > 1, else ask with --only tensor_parallel)
  expert parallel 2 ranks × ep=2 vs the reference at ep=1 (MoE models, fsdp/hsdp, tuning=full or
                  lora; losses and exported weights; on by default when strategy.ep > 1, else ask
                  with --only expert_parallel)

Prints a pass/fail table with the measured differences and tolerances (also verify.json in the
work dir); exit 0 when every applicable check passed, 1 otherwise, 2 on a config error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from distft.errors import DistftError
from distft.verify import checks, runs

ALL = (
    "grad_accum",
    "world_size",
    "resume",
    "packing",
    "cp",
    "eos",
    "export",
    "tensor_parallel",
    "expert_parallel",
)
DEFAULT = ALL[:-2]  # tensor_parallel / expert_parallel join them when the config sets strategy.tp / ep > 1


def shrink(cfg, steps: int, micro: int) -> list[str]:
    """Overrides that make the user's config small; the user's own overrides come first."""
    out = [
        "train.progress=false",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro}",
        "train.grad_accum=1",
        "train.eval_every=0",
        "train.eval_generate=false",
        "train.save_every=0",
        "train.keep_last=100",
        "train.log_every=1",
        "train.export=none",
        "data.max_eval_generations=0",
        "eval.test=false",
        "eval.patience=0",
        "logger=none",  # no dashboard runs for a self-check
        "resume=never",
    ]
    if hasattr(cfg.strategy, "cp"):  # the data-parallel checks run data-parallel; `cp` adds its own
        out += ["strategy.cp=1", "strategy.tp=1"]
    if hasattr(cfg.strategy, "ep"):
        out.append("strategy.ep=1")
    if not cfg.model.name_or_path:  # the generated tiny model: fewer layers
        out.append(f"model.num_layers={min(2, cfg.model.num_layers)}")
    if not cfg.data.path:  # embedded default data: fewer rows
        out.append("data.num_examples=200")
    return out


def main(argv: list[str] | None = None) -> int:
    from distft.config.cli import early_exit, epilog

    if (
        rc := early_exit("distft-verify", __doc__, sys.argv[1:] if argv is None else argv, help=False)
    ) is not None:  # --cfg job
        return rc
    parser = argparse.ArgumentParser(
        prog="distft-verify",
        description=__doc__.split("\n\n")[0],
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", help="where the runs go (default: a temp dir, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of each run (even, >= 4)")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch of the 2-rank reference run")
    parser.add_argument("--eos-steps", type=int, default=120, help="steps of the run that learns EOS")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args, overrides = parser.parse_known_args(argv)
    wanted = [c.strip() for c in (args.only or ",".join(ALL)).split(",") if c.strip()]
    if unknown := set(wanted) - set(ALL):
        parser.error(f"--only: unknown checks {sorted(unknown)}; valid: {', '.join(ALL)}")
    try:
        from distft.config.load import load_config, validate

        cfg, _ = load_config(overrides)
        validate(cfg)
        user_tp = getattr(cfg.strategy, "tp", 1)  # the shrunk config runs data-parallel
        user_ep = getattr(cfg.strategy, "ep", 1)
        small = [*overrides, *shrink(cfg, args.steps, args.micro)]
        cfg, _ = load_config(small)
        validate(cfg)
    except DistftError as e:
        print(f"distft-verify: error: {e}", file=sys.stderr)
        return 2
    if args.only is None:
        wanted = [
            *DEFAULT,
            *(["tensor_parallel"] if user_tp > 1 else []),
            *(["expert_parallel"] if user_ep > 1 else []),
        ]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="distft-verify-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"distft-verify: strategy={cfg.strategy.name} tuning={cfg.tuning.name} method={cfg.method.name} "
        f"precision={cfg.train.precision}; runs in {work}",
        flush=True,
    )
    results = run_checks(cfg, small, wanted, work, args)
    print_table(results)
    (work / "verify.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r.passed is not False for r in results)
    print(f"distft-verify: {'all checks passed' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def run_checks(cfg, small: list[str], wanted: list[str], work: Path, args) -> list[checks.Check]:
    k, m, steps = args.steps // 2, args.micro, args.steps
    tol = checks.LOSS_TOL[cfg.train.precision]
    out: list[checks.Check] = []

    def train(name: str, nproc: int, *extra: str) -> Path:
        print(f"distft-verify: run {name} ({nproc} rank{'s' if nproc > 1 else ''})", flush=True)
        runs.run(work / name, [*small, *extra], nproc, args.timeout)
        return work / name

    needs_ref = {"grad_accum", "world_size", "resume", "export", "packing", "cp", "tensor_parallel"}
    needs_ref = (needs_ref | {"expert_parallel"}) & set(wanted)
    ref = None
    if needs_ref:
        exported = {"export", "expert_parallel"} & set(wanted)
        export = ["train.export=last" if exported else "train.export=none"]
        if "expert_parallel" in wanted and hasattr(cfg.tuning, "merge_on_export"):
            export.append("tuning.merge_on_export=true")  # an adapter is compared by its merged weights
        ref = train("reference", 2, f"train.save_every={k}", *export)
    if "grad_accum" in wanted:
        run = train("grad_accum", 2, f"train.micro_batch_size={max(1, m // 2)}", "train.grad_accum=2")
        what = f"2 ranks × micro {max(1, m // 2)} × accum 2 vs 2 ranks × micro {m}"
        out.append(checks.compare_losses("grad accum", run, ref, range(1, steps + 1), tol, what))
    if "world_size" in wanted:
        run = train("one_rank", 1, f"train.micro_batch_size={m}", "train.grad_accum=2")
        what = f"1 rank × micro {m} × accum 2 vs 2 ranks × micro {m}"
        out.append(checks.compare_losses("1 vs 2 ranks", run, ref, range(1, steps + 1), tol, what))
    if "resume" in wanted:
        start = ref / "checkpoints" / f"step_{k}"
        run = train("resumed", 2, f"resume={start}")
        what = f"resumed from step {k} vs uninterrupted"
        out.append(checks.compare_losses("resume", run, ref, range(k + 1, steps + 1), tol, what))
    if "cp" in wanted:
        from distft.strategies.fsdp import CP_METHODS

        if not hasattr(cfg.strategy, "cp") or cfg.method.name not in CP_METHODS:
            why = (
                f"strategy={cfg.strategy.name} method={cfg.method.name}: cp needs fsdp or hsdp and "
                f"method={'|'.join(CP_METHODS)}"
            )
            out.append(checks.Check("context parallel", None, "n/a", "-", why))
        else:
            run = train("cp", 2, "strategy.cp=2", f"train.micro_batch_size={m}", "train.grad_accum=2")
            what = f"cp=2 (2 ranks × micro {m} × accum 2, dp=1) vs 2 ranks × micro {m} (dp=2)"
            out.append(checks.compare_losses("context parallel", run, ref, range(1, steps + 1), tol, what))
    if "packing" in wanted:
        out.append(_guarded("packing = no packing", lambda: checks.check_packing(cfg, ref)))
    if "export" in wanted:
        out.append(_guarded("export loadable", lambda: checks.check_export(cfg, ref)))
    if "eos" in wanted:
        eos_overrides = [f"train.max_steps={args.eos_steps}", "train.export=last", "train.micro_batch_size=8"]
        eos_overrides.append("data.packing=false")  # one example per row: its prompt is easy to find
        if not cfg.data.path:
            eos_overrides.append("data.num_examples=40")  # few examples, learnt by heart
        run = train("eos", 1, *eos_overrides)
        from distft.config.load import load_config

        eos_cfg, _ = load_config([*small, *eos_overrides, f"output_dir={run}"])
        out.append(_guarded("EOS trained", lambda: checks.check_eos(eos_cfg, run)))
    if "tensor_parallel" in wanted:
        out.append(_tensor_parallel(cfg, train, ref, m, steps, tol))
    if "expert_parallel" in wanted:
        out.append(_expert_parallel(cfg, train, ref, k, steps, tol))
    return out


def _expert_parallel(cfg, train, ref: Path, k: int, steps: int, tol: float) -> checks.Check:
    """2 ranks with the experts split over them (ep=2) vs the reference (ep=1, same global batch):
    losses, and the exported weights (ordinary HF files: the experts gathered whole)."""
    name = "expert parallel"
    from distft.errors import ConfigError
    from distft.strategies import fsdp

    if not hasattr(cfg.strategy, "ep"):
        return checks.Check(name, None, "n/a", "-", "strategy.ep is a strategy=fsdp/hsdp setting")
    try:
        fsdp.check_ep(cfg, 2, ep=2)
    except ConfigError as e:
        return checks.Check(name, None, "n/a", "-", str(e))
    merged = ["tuning.merge_on_export=true"] if hasattr(cfg.tuning, "merge_on_export") else []
    run = train("expert_parallel", 2, "strategy.ep=2", "train.export=last", f"train.save_every={k}", *merged)
    what = "2 ranks at ep=2 vs 2 ranks at ep=1"
    losses = checks.compare_losses(name, run, ref, range(1, steps + 1), tol, what)
    if not losses.passed:
        return losses
    weights = _guarded(name, lambda: checks.compare_exports(name, run, ref, tol, what))
    measured = f"{losses.measured}, {weights.measured}"
    detail = f"{losses.detail}; {weights.detail.split('; ', 1)[-1]}"
    return checks.Check(name, weights.passed, measured, losses.tolerance, detail)


def _tensor_parallel(cfg, train, ref: Path, micro: int, steps: int, tol: float) -> checks.Check:
    """2 ranks with the other tensor-parallel degree (2 if the config's is 1, else 1), grad accum
    making up the global batch of the reference (2 ranks × micro × 1 at the config's tp)."""
    name = "tensor parallel"
    if cfg.strategy.name != "fsdp":
        return checks.Check(name, None, "n/a", "-", "strategy.tp is a strategy=fsdp setting")
    from distft.parallel import tp as tensor_parallel

    if cfg.tuning.name not in tensor_parallel.TP_TUNINGS or cfg.method.name not in tensor_parallel.TP_METHODS:
        why = f"tuning={cfg.tuning.name} method={cfg.method.name} refuse strategy.tp>1"
        return checks.Check(name, None, "n/a", "-", why)
    mine = tensor_parallel.degree(cfg)
    if mine == 1:  # reference: 2 data-parallel ranks × micro; here 1 replica of 2 tp ranks × accum 2
        other, shape = 2, [f"train.micro_batch_size={micro}", "train.grad_accum=2"]
    else:  # reference: one replica × micro; here 2 data-parallel ranks × micro / 2
        other, shape = 1, [f"train.micro_batch_size={max(1, micro // 2)}", "train.grad_accum=1"]
    run = train("tensor_parallel", 2, f"strategy.tp={other}", *shape)
    what = f"2 ranks at tp={other} ({', '.join(shape)}) vs 2 ranks at tp={mine}, micro {micro}"
    return checks.compare_losses(name, run, ref, range(1, steps + 1), tol, what)


def _guarded(name: str, fn) -> checks.Check:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, reported in the table
        return checks.Check(name, False, "error", "-", f"{type(e).__name__}: {e}")


def print_table(results: list[checks.Check]) -> None:
    rows = [("check", "result", "measured", "tolerance", "detail")]
    for r in results:
        result = "n/a" if r.passed is None else ("PASS" if r.passed else "FAIL")
        rows.append((r.name, result, r.measured, r.tolerance, r.detail.replace("\n", " ")[-200:]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
