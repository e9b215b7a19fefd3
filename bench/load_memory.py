"""Host RAM while loading a model (ANCHORS #6): per-node peak RSS of Trainer.build (config, data,
model load, strategy setup; no training step) with 1 and 2 ranks, per tuning and strategy.

    .venv/bin/python bench/load_memory.py                      # full, lora, qlora × fsdp, zero3
    .venv/bin/python bench/load_memory.py --tunings lora --strategies fsdp,ddp

The load's share is each rank's peak minus the same build on distft's 0.65M-parameter model (the
runtime: Python, torch, libraries, data), summed over the node's ranks. Target: 2 ranks at most
1.3× of 1 rank for a model of tens of millions of parameters, with a sharded strategy (FSDP2 reads
only each rank's rows of every weight; ZeRO-3 partitions each weight as it is built). DDP needs a
full replica per rank and is shown for reference. Results: outputs/bench/load/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import REPO, bench_env, build_model_dir, launch
from memory_scaling import SHAPE, TINY


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="fsdp,zero3")
    p.add_argument("--mmap-threshold", default="65536")
    p.add_argument("--checkpoint-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument(
        "--tunings", default="full,lora,qlora", help="tuning= of the probe (full, lora, qlora, ...)"
    )
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="train.precision=")
    p.add_argument("--out", default=str(REPO / "outputs/bench/load"))
    return p.parse_args()


def as_dtype(path: Path, dtype: str) -> Path:
    """The model re-saved in `dtype` (hub checkpoints are usually bf16; full fine-tuning loads fp32)."""
    if dtype == "fp32":
        return path
    import shutil as sh

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = path.with_name(f"{path.name}-{dtype}")
    if not (dest / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype={"bf16": torch.bfloat16}[dtype])
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(path).save_pretrained(dest)
        sh.copy(path / "generation_config.json", dest) if (
            path / "generation_config.json"
        ).is_file() else None
    return dest


def probe(model_dir: Path, strategy: str, nproc: int, out: Path, mmap: str, extra=()) -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        *extra, f"output_dir={out}", "resume=never", f"model.name_or_path={model_dir}",
        f"strategy={strategy}",
        "data.num_examples=400", "train.progress=false", "train.eval_generate=false", "train.max_steps=1",
    ]  # fmt: skip
    env = bench_env(**({"MALLOC_MMAP_THRESHOLD_": mmap} if mmap else {}))
    return launch("load_probe", args, nproc, out / "rss", out / "run.log", env=env)["rss_gib"]


def main() -> None:
    a = parse()
    out = Path(a.out)
    big = as_dtype(build_model_dir(out / "model-70M", **SHAPE), a.checkpoint_dtype)
    tiny = as_dtype(build_model_dir(out / "model-tiny", **TINY), a.checkpoint_dtype)
    results = {}
    combos = [(t, s) for t in a.tunings.split(",") for s in a.strategies.split(",")]
    for tuning, strategy in combos:
        extra = [f"tuning={tuning}", f"train.precision={a.precision}"]
        for nproc in (1, 2):
            name = f"{tuning}-{strategy}-{nproc}"
            base = probe(tiny, strategy, nproc, out / f"{name}-tiny", a.mmap_threshold, extra)
            peak = probe(big, strategy, nproc, out / name, a.mmap_threshold, extra)
            load = sum(p - b for p, b in zip(peak, base))
            results[name] = {"peak_gib": peak, "baseline_gib": base, "load_gib": load}
            print(f"{name}: peak {peak} baseline {base} → load {load:.3f} GiB", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"70.9M-parameter Llama shape ({4 * 70.9e6 / 2**30:.2f} GiB in fp32), {a.checkpoint_dtype} "
        f"checkpoint, train.precision={a.precision}; Trainer.build + one read of every held parameter",
        "",
        "| tuning | strategy | ranks | peak RSS per rank (GiB) | load share per node (GiB) | 2 ranks / 1 rank |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for tuning, strategy in combos:
        one = results[f"{tuning}-{strategy}-1"]["load_gib"]
        for nproc in (1, 2):
            r = results[f"{tuning}-{strategy}-{nproc}"]
            ratio = f"{r['load_gib'] / one:.2f}" if nproc == 2 else "-"
            peaks = " / ".join(f"{x:.2f}" for x in r["peak_gib"])
            lines.append(f"| {tuning} | {strategy} | {nproc} | {peaks} | {r['load_gib']:.3f} | {ratio} |")
    rows = "\n".join(lines) + "\n"
    (out / "results.md").write_text(rows)
    print(rows)


if __name__ == "__main__":
    main()
