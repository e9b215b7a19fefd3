"""Per-rank peak memory of one training job under ddp / zero1 / zero2 / zero3 / fsdp, against
the ZeRO formula and the planner's estimate.

    .venv/bin/python bench/memory_scaling.py                       # ~70M-param Llama, 2 ranks
    .venv/bin/python bench/memory_scaling.py --nproc 1 --strategies ddp

glibc's dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=65536) so freed blocks go back
to the OS and peak RSS shows what sharding saves. Model-state memory is measured as peak RSS minus
the peak of the same job on distft's 0.65M-parameter default model (the runtime baseline: Python,
torch, libraries, data), per rank. Results: outputs/bench/memory/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import REPO, bench_env, launch, metrics

# ~70M parameters with the character vocabulary: 10 layers of width 768 (the scale).
SHAPE = {"hidden_size": 768, "num_layers": 10, "num_heads": 12, "num_kv_heads": 12, "intermediate_size": 2048}
TINY = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 384}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="ddp,zero1,zero2,zero3,fsdp")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--mmap-threshold", default="65536", help="MALLOC_MMAP_THRESHOLD_ ('' leaves glibc's default)"
    )
    p.add_argument("--shape", default=json.dumps(SHAPE))
    p.add_argument("--extra", default="", help="extra overrides for every run, space separated")
    p.add_argument("--out", default=str(REPO / "outputs/bench/memory"))
    return p.parse_args()


def overrides(shape: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in shape.items()]


def run(a, strategy: str, shape: dict, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"output_dir={out}", "resume=never", f"strategy={strategy}", f"train.precision={a.precision}",
        f"train.max_steps={a.steps}", f"train.micro_batch_size={a.micro}", "data.num_examples=400",
        "train.eval_generate=false", "train.progress=false", "train.export=none", *overrides(shape),
        *a.extra.split(),
    ]  # fmt: skip
    env = bench_env(**({"MALLOC_MMAP_THRESHOLD_": a.mmap_threshold} if a.mmap_threshold else {}))
    res = launch("distft.train", args, a.nproc, out / "rss", out / "run.log", env=env)
    rows = [r for r in metrics(out) if "mem_gib" in r]
    res["train_peak_rank0_gib"] = rows[-1]["mem_gib"]  # peak through the last step (before the save)
    return res


def param_count(shape: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    a = parse()
    out = Path(a.out)
    shape = json.loads(a.shape)
    psi = param_count(shape)
    n = a.nproc
    formula = {  # ZeRO paper, 16 bytes per parameter with Adam (fp32 here: 4 + 4 + 8)
        "ddp": 16 * psi,
        "zero1": 4 * psi + 4 * psi + 8 * psi / n,  # params + full grads + sharded Adam
        "zero2": 4 * psi + 12 * psi / n,
        "zero3": 16 * psi / n,
        "fsdp": 16 * psi / n,
    }
    results = {"args": vars(a), "params": psi, "runs": {}}
    print(f"model: {psi / 1e6:.1f}M parameters; {n} ranks", flush=True)
    for strategy in a.strategies.split(","):
        base = run(a, strategy, TINY, out / f"{strategy}-baseline")
        big = run(a, strategy, shape, out / strategy)
        row = {
            "baseline_rss_gib": base["rss_gib"],
            "rss_gib": big["rss_gib"],
            "train_peak_rank0_gib": big["train_peak_rank0_gib"],
            "baseline_train_peak_rank0_gib": base["train_peak_rank0_gib"],
            "states_gib": big["train_peak_rank0_gib"] - base["train_peak_rank0_gib"],
            "formula_gib": formula.get(strategy, float("nan")) / 2**30,
        }
        results["runs"][strategy] = row
        print(
            f"{strategy:6s} peak rank0 {row['train_peak_rank0_gib']:.2f} GiB (baseline "
            f"{row['baseline_train_peak_rank0_gib']:.2f}) → states {row['states_gib']:.2f} GiB vs formula "
            f"{row['formula_gib']:.2f}; whole-run peak per rank "
            f"{'/'.join(f'{x:.2f}' for x in row['rss_gib'])}",
            flush=True,
        )
        (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"{psi / 1e6:.1f}M parameters, {n} ranks, {a.precision}, micro {a.micro}, "
        f"MALLOC_MMAP_THRESHOLD_={a.mmap_threshold or 'default'}",
        "",
        "| strategy | peak RSS rank 0 (GiB) | minus baseline (GiB) | ZeRO formula (GiB) "
        "| measured / formula |",
        "|---|---|---|---|---|",
    ]
    for s, r in results["runs"].items():
        lines.append(
            f"| {s} | {r['train_peak_rank0_gib']:.2f} | {r['states_gib']:.2f} | {r['formula_gib']:.2f} | "
            f"{r['states_gib'] / r['formula_gib']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
