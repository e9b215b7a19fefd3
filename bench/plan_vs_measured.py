"""The planner's per-rank estimate against measured peak memory of real CPU runs, at two model
sizes and 1 / 2 ranks, with DeepSpeed's own model-state estimators beside it.

    .venv/bin/python bench/plan_vs_measured.py
    .venv/bin/python bench/plan_vs_measured.py --sizes 20M --strategies ddp,fsdp
    .venv/bin/python bench/plan_vs_measured.py --sizes 20M --strategies fsdp --tunings full,lora,qlora \
        --no-ddp1

Measured: rank 0's peak RSS through the last training step (`mem_gib` in metrics.jsonl), glibc's
mmap threshold pinned as in bench/memory_scaling.py. Estimated: `distft-plan`'s total for the same
config (model states + activations + buffers + runtime). DeepSpeed's estimators assume bf16 on GPUs,
so they are compared with the planner's estimate for that setting (model states only).
Results: outputs/bench/plan/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import REPO
from memory_scaling import SHAPE, overrides, run

SIZES = {
    "20M": {
        "hidden_size": 512,
        "num_layers": 6,
        "num_heads": 8,
        "num_kv_heads": 8,
        "intermediate_size": 1536,
    },
    "70M": SHAPE,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20M,70M")
    p.add_argument("--strategies", default="ddp,zero2,zero3,fsdp", help="run at 2 ranks (ddp also at 1)")
    p.add_argument("--tunings", default="full", help="tuning options, each run with every strategy")
    p.add_argument("--no-ddp1", action="store_true", help="skip the 1-rank DDP reference run")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--mmap-threshold", default="65536")
    p.add_argument("--extra", default="")
    p.add_argument("--out", default=str(REPO / "outputs/bench/plan"))
    return p.parse_args()


def planner(shape: dict, strategy: str, nproc: int, a, seq: int, tuning: str = "full"):
    from distft.config.load import load_config
    from distft.plan.auto import plan_one, strategy_config
    from distft.plan.shape import model_shape

    cfg = load_config(
        [*overrides(shape), f"strategy={strategy}", f"train.precision={a.precision}", f"tuning={tuning}"]
    )[0]
    ms = model_shape(cfg)
    return ms, plan_one(cfg, ms, strategy_config(strategy), nproc, a.micro, seq), cfg


def deepspeed_states(ms, strategy: str, nproc: int) -> float | None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if strategy == "zero2":
        return estimate_zero2_model_states_mem_needs(ms.params, num_gpus_per_node=nproc, cpu_offload=False)[1]
    if strategy == "zero3":
        return estimate_zero3_model_states_mem_needs(
            ms.params, ms.largest_layer, num_gpus_per_node=nproc, cpu_offload=False, cpu_offload_params=False
        )[1]
    return None


def main() -> None:
    from distft.plan.memory import GIB, estimate

    a = parse()
    out = Path(a.out)
    cases = []
    extra = a.extra
    for size in a.sizes.split(","):
        for tuning in a.tunings.split(","):
            if not a.no_ddp1:
                cases.append((size, "ddp", 1, tuning))
            cases += [(size, s, 2, tuning) for s in a.strategies.split(",")]
    results = []
    for size, strategy, nproc, tuning in cases:
        shape = SIZES[size]
        a.nproc = nproc
        a.extra = f"{extra} tuning={tuning}"
        name = f"{size}-{tuning}-{strategy}-{nproc}"
        r = run(a, strategy, shape, out / name)
        seq = json.loads((out / name / "data_report.json").read_text())["splits"]
        seq = seq["train"]["tokens_max"]
        ms, est, _ = planner(shape, strategy, nproc, a, seq, tuning)
        ds = deepspeed_states(ms, strategy, nproc)
        ours_bf16 = estimate(
            ms,
            strategy,
            nproc,
            a.micro,
            seq,
            precision="bf16",
            gpu=True,
            tuning=tuning,
            adapter=tuning != "full",
        ).states
        row = {
            "size": size,
            "params": ms.params,
            "strategy": strategy,
            "tuning": tuning,
            "ranks": nproc,
            "measured_gib": r["train_peak_rank0_gib"],
            "estimate_gib": est.total / GIB,
            "ratio": est.total / GIB / r["train_peak_rank0_gib"],
            "deepspeed_bf16_states_gib": ds / GIB if ds else None,
            "planner_bf16_states_gib": ours_bf16 / GIB,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": results}, indent=1))
    lines = [
        f"{a.precision}, micro {a.micro}, CPU ranks (gloo), MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}; "
        "peak RSS of rank 0 through the last step",
        "",
        "| model | tuning | strategy | ranks | measured (GiB) | planner (GiB) | planner / measured "
        "| DeepSpeed estimator, bf16 GPU states (GiB) | planner, same setting (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ds = f"{r['deepspeed_bf16_states_gib']:.3f}" if r["deepspeed_bf16_states_gib"] else "-"
        lines.append(
            f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {r['tuning']} | {r['strategy']} | {r['ranks']} | "
            f"{r['measured_gib']:.3f} | {r['estimate_gib']:.3f} | {r['ratio']:.2f} | {ds} | "
            f"{r['planner_bf16_states_gib']:.3f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
