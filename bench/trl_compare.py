"""distft SFT vs TRL's SFTTrainer on the same work, alternating runs, repeated.

    .venv/bin/python bench/trl_compare.py                      # full, lora, qlora; 3 repeats
    .venv/bin/python bench/trl_compare.py --tunings full --repeats 5
    .venv/bin/python bench/trl_compare.py --tunings full --strategy zero2 --rows 2000 --micro 8  # issue 18

Same model directory (distft's tiny Llama, random init), tokenizer, data rows (the embedded
sort/reverse task, no split, no eval), max length, micro-batch, grad-accum, ranks, strategy,
precision, learning-rate schedule, seed (`--seed`); one epoch; both save the final model. With
`--order same` (default) TRL trains on distft's prepared rows in distft's batch order (each
optimizer step takes the same global batch), so the losses compare step for step; `--order own`
lets each side shuffle by itself, and then the held-out loss of this short job varies by ~0.5
nats with the order alone (bench/RESULTS.md, "The short-job loss gap"). Each side runs through
bench/rss.py (peak RSS per rank). Reported per run: steady-state non-padding tokens/s (steps after
the first 10%), time from launch to the end of the first optimizer step, peak RSS per rank, the
loss averaged over the last 10 steps and over the epoch, and (full tuning) each saved model's loss
on the next 200 rows of the embedded task (bench/common.py heldout_loss); then distft/TRL ratios as
min/median/max over the repeats. Results land in outputs/bench/trl/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import REPO, build_model_dir, heldout_loss, launch, load_average, metrics, spread

HELDOUT = 200
"""Rows after the training rows of the same embedded task, scored on every side's saved model."""


def heldout(a, tuning: str, model_dir: Path, trained: Path) -> float:
    """Held-out loss of a full-tuning side's saved model (bench/common.py heldout_loss); adapters: nan."""
    from distft.data.default_tasks import sft_rows

    if tuning != "full":
        return float("nan")
    return heldout_loss(trained, model_dir, sft_rows(a.rows + HELDOUT)[a.rows :])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunings", default="full,lora,qlora")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rows", type=int, default=4800)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(REPO / "outputs/bench/trl"))
    p.add_argument("--seed", type=int, default=42, help="both sides' seed (distft train.seed, TRL --seed)")
    p.add_argument(
        "--order",
        default="same",
        choices=["same", "own"],
        help="same: TRL trains on distft's rows in distft's batch order (the losses compare); "
        "own: each side shuffles with its own sampler (held-out loss then varies by ~0.5 nats with the seed)",
    )
    p.add_argument("--distft-extra", default="", help="extra distft overrides, space separated")
    return p.parse_args()


def steady(stamps: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(tokens/s after the first 10% of steps, unix time of the end of step 1) from per-step
    (step, time, tokens in that step)."""
    stamps = sorted(stamps)
    w = max(1, len(stamps) // 10)
    tokens = sum(s[2] for s in stamps[w:])
    return tokens / max(stamps[-1][1] - stamps[w - 1][1], 1e-9), stamps[0][1]


def distft_stamps(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, time, tokens in that step) from distft's logged rows: tokens/s × the time since the
    previous row (the first row counts none)."""
    stamps, prev = [], None
    for r in rows:
        stamps.append(
            (r["step"], r["time"], r["tokens_per_s"] * (r["time"] - prev) if prev is not None else 0.0)
        )
        prev = r["time"]
    return stamps


def trl_stamps(steps: list[dict]) -> list[tuple[int, float, float]]:
    """(step, time, tokens in that step) from bench/trl_sft.py's cumulative token counts."""
    stamps, prev = [], 0
    for s in steps:
        stamps.append((s["step"], s["time"], s["tokens"] - prev))
        prev = s["tokens"]
    return stamps


def order_file(out: Path, tuning: str) -> Path:
    return out / f"distft-order-{tuning}.jsonl"


def write_distft_order(a, run: Path, path: Path) -> None:
    """The rows distft trained on (its prepared train split), in its sampler's order for the epoch,
    as prompt/completion JSONL: TRL reads them in file order (`--sequential`), and with the same
    micro-batch and ranks each of its optimizer steps takes distft's global batch."""
    from distft.data.sampler import GlobalBatchSampler

    rows = [json.loads(x) for x in (run / "data/train.jsonl").read_text().splitlines() if x.strip()]
    sampler = GlobalBatchSampler(len(rows), a.micro * a.accum * a.nproc, a.seed)
    order = [i for step in range(sampler.steps_per_epoch) for i in sampler.global_indices(step)]
    lines = (json.dumps({"prompt": rows[i]["prompt"], "completion": rows[i]["completion"]}) for i in order)
    path.write_text("\n".join(lines) + "\n")


def run_distft(a, tuning: str, model_dir: Path, out: Path, warmup: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"output_dir={out}", "resume=never", f"model.name_or_path={model_dir}",
        f"tuning={tuning}", f"strategy={a.strategy}", f"train.precision={a.precision}",
        f"data.num_examples={a.rows}", "data.splits=[1,0,0]", f"data.max_length={a.max_length}",
        "train.epochs=1", "train.eval_every=0", "train.eval_generate=false", "train.progress=false",
        f"train.micro_batch_size={a.micro}", f"train.grad_accum={a.accum}", f"train.lr={a.lr}",
        f"train.warmup_steps={warmup}", "train.lr_scheduler=cosine", f"train.seed={a.seed}",
        *a.distft_extra.split(),
    ]  # fmt: skip
    res = launch("distft.train", args, a.nproc, out / "rss", out / "run.log")
    write_distft_order(a, out, order_file(out.parent, tuning))
    rows = [r for r in metrics(out) if "loss" in r]
    tps, first = steady(distft_stamps(rows))
    losses = [r["loss"] for r in rows]
    return {
        **res,
        "tokens_per_s": tps,
        "first_step_s": first - res["t0"],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "epoch_loss": sum(losses) / len(losses),
        "steps": len(rows),
        "heldout_loss": heldout(a, tuning, model_dir, out / "export"),
    }


def run_trl(a, tuning: str, model_dir: Path, out: Path, warmup: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "--model", str(model_dir), "--out", str(out), "--rows", str(a.rows), "--tuning", tuning,
        "--strategy", a.strategy, "--precision", a.precision, "--micro", str(a.micro),
        "--accum", str(a.accum), "--lr", str(a.lr), "--warmup", str(warmup),
        "--max-length", str(a.max_length), "--seed", str(a.seed),
    ]  # fmt: skip
    if a.order == "same":  # distft ran first in repeat 0 and its order does not change between repeats
        args += ["--data", str(order_file(out.parent, tuning)), "--sequential"]
    res = launch("trl_sft", args, a.nproc, out / "rss", out / "run.log")
    t = json.loads((out / "bench_timing.json").read_text())
    stamps = trl_stamps(t["steps"])
    tps, first = steady(stamps)
    return {
        **res,
        "tokens_per_s": tps,
        "first_step_s": first - res["t0"],
        "final_loss": t["last_logged_loss"],  # the mean of the last 10 steps' losses
        "epoch_loss": t["train_loss"],
        "steps": len(stamps),
        "heldout_loss": heldout(a, tuning, model_dir, out / "final"),
    }


def main() -> None:
    a = parse()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(out / "model")
    steps = a.rows // (a.micro * a.accum * a.nproc)
    warmup = int(0.05 * steps)
    tunings = a.tunings.split(",")
    results: list[dict] = []
    for rep in range(a.repeats):
        for tuning in tunings:
            # Alternate who goes first, so drifting load on shared cores hits both sides alike.
            order = ["distft", "trl"] if rep % 2 == 0 else ["trl", "distft"]
            for side in order:
                run = run_distft if side == "distft" else run_trl
                load = load_average()
                r = run(a, tuning, model_dir, out / f"{side}-{tuning}", warmup)
                r.update(side=side, tuning=tuning, repeat=rep, load_before=load)
                results.append(r)
                print(
                    f"[{rep}] {tuning:5s} {side:6s} tok/s {r['tokens_per_s']:8.0f}  first step "
                    f"{r['first_step_s']:5.1f}s  wall {r['wall_s']:5.1f}s  rss/rank "
                    f"{'/'.join(f'{x:.2f}' for x in r['rss_gib'])} GiB  loss(last10) "
                    f"{r['final_loss']:.4f}  held-out {r['heldout_loss']:.4f}  load {load:.1f}",
                    flush=True,
                )
                (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": results}, indent=1))
    md = summarize(results, tunings, a)
    (out / "results.md").write_text(md)
    print(md)


def summarize(results: list[dict], tunings: list[str], a) -> str:
    def pick(side, tuning):
        return sorted(
            (r for r in results if r["side"] == side and r["tuning"] == tuning), key=lambda r: r["repeat"]
        )

    lines = [
        f"{a.nproc} ranks, strategy={a.strategy}, precision={a.precision}, {a.rows} rows, micro {a.micro}, "
        f"accum {a.accum}, max_length {a.max_length}, 1 epoch; min / median / max over {a.repeats} repeats",
        "",
        "| tuning | side | tokens/s | whole job (s) | first step (s) | peak RSS/rank (GiB) "
        "| loss, last 10 steps | loss, epoch mean | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tuning in tunings:
        for side in ("distft", "trl"):
            rs = pick(side, tuning)
            lines.append(
                f"| {tuning} | {side} | {spread([r['tokens_per_s'] for r in rs])} | "
                f"{spread([r['wall_s'] for r in rs])} | {spread([r['first_step_s'] for r in rs])} | "
                f"{spread([max(r['rss_gib']) for r in rs])} | "
                f"{spread([r['final_loss'] for r in rs])} | {spread([r['epoch_loss'] for r in rs])} | "
                f"{spread([r['heldout_loss'] for r in rs])} |"
            )
    lines += [
        "",
        "| tuning | tokens/s distft/TRL | whole job distft/TRL | first step distft/TRL "
        "| peak RSS distft/TRL | last-10 loss distft − TRL | held-out loss distft − TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    for tuning in tunings:
        d, t = pick("distft", tuning), pick("trl", tuning)
        pairs = list(zip(d, t))
        lines.append(
            f"| {tuning} | {spread([x['tokens_per_s'] / y['tokens_per_s'] for x, y in pairs])} | "
            f"{spread([x['wall_s'] / y['wall_s'] for x, y in pairs])} | "
            f"{spread([x['first_step_s'] / y['first_step_s'] for x, y in pairs])} | "
            f"{spread([max(x['rss_gib']) / max(y['rss_gib']) for x, y in pairs])} | "
            f"{spread([x['final_loss'] - y['final_loss'] for x, y in pairs])} | "
            f"{spread([x['heldout_loss'] - y['heldout_loss'] for x, y in pairs])} |"
        )
    loads = [r["load_before"] for r in results]
    lines += ["", f"1-minute load average before the runs: {spread(loads)} (2 cores)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
