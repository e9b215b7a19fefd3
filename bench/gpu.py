"""GPU benchmark (needs CUDA; no downloads: random init with the real shapes), one table:

  1. MFU: a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256),
     bf16, FSDP2, sequence 2048 — target ≥ 40% on an H100 (torchtitan / llm-foundry level).
  2. QLoRA peak memory: a Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32/8 heads, MLP 14336,
     vocab 128256), NF4 + LoRA r=8, bf16, gradient checkpointing, sequence 2048, micro-batch 1 —
     target ≤ 8 GiB (torchtune: 7.4 GiB on an RTX 4090).
  3. Long context: the 1B shape on 32k-token rows, each sequence split over all GPUs by context
     parallelism (`--cp-style ulysses|allgather|ring`), checkpointing and chunked loss.
  4. The realistic workload (bench/realistic.py's log-normal instruction rows and BPE tokenizer) on a
     1B Llama shape, packed (flash-attention varlen where flash_attn is installed), bf16, compile
     off and on, Liger where installed: MFU against the GPU's peak, target ≥ 45%.

    .venv/bin/python bench/gpu.py                 # both, on all visible GPUs for the MFU run
    .venv/bin/python bench/gpu.py --only mfu --gpus 8 --micro 2
    .venv/bin/python bench/gpu.py --only kernels  # the MFU run without, then with Liger + flash-attn
    .venv/bin/python bench/gpu.py --only longctx  # 32k-token rows split over all GPUs (strategy.cp)
    .venv/bin/python bench/gpu.py --only realistic  # instruction-like length spread, packed
    .venv/bin/python bench/gpu.py --smoke         # CPU, shrunken shapes: checks the script itself

Both run distft's own training entry (`python -m distft.train`) on a model directory written
here (random weights, distft's character tokenizer; token ids stay below its 102 symbols, the
full 128256-row head is still computed) and on synthetic rows of exactly 2048 tokens, so batches
have no padding. Each is the real end of a job: the run saves its checkpoint and writes export/
(QLoRA: the adapter, verified by reloading the 4-bit base), then a second launch resumes it from
checkpoints/latest for RESUME_STEPS more steps and exports again. Numbers are read from
metrics.jsonl (`mfu`, `tokens_per_s`, `mem_gib` = peak torch.cuda.max_memory_allocated; the CUDA
context is not included); what holds the memory is the planner's per-rank terms for the same
config (distft.plan: parameters, gradients, optimizer state, activations of the decoder blocks,
logits with their fp32 copy and gradient, buffers), printed beside the measured peak.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
from pathlib import Path

from common import REPO, bench_env, launch, metrics

RESUME_STEPS = 2  # steps the resumed launch adds

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
)  # fmt: skip
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
)  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["mfu", "qlora", "kernels", "longctx", "realistic"], default=None)
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the MFU run (0: all visible)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch of the MFU run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--compile", action="store_true", help="train.compile=true for the MFU run")
    p.add_argument("--long-seq", type=int, default=32768, help="tokens per row of the long-context run")
    p.add_argument("--cp-style", default="ulysses", help="strategy.cp_style of the long-context run")
    p.add_argument("--out", default=str(REPO / "outputs/bench/gpu"))
    p.add_argument(
        "--smoke", action="store_true", help="CPU, 2 layers of width 64, seq 128, 3 steps: the script runs"
    )
    a = p.parse_args()
    if a.smoke:
        a.seq, a.steps, a.micro, a.gpus, a.long_seq = 128, 3, 2, 1, 256
    return a


SMOKE = " [smoke: CPU, 2 layers of width 64]"


def shrink(shape: dict) -> dict:
    """--smoke: the real vocabulary and head layout, 2 layers of width 64."""
    return {**shape, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def write_model(path: Path, shape: dict, positions: int = 8192) -> Path:
    """Random-init Llama with the given shape in bf16 (initialized on the GPU, saved once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.models.tiny import build_tokenizer

    if (path / "config.json").is_file():
        return path
    tok = build_tokenizer()
    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=positions,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    tmp.rename(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def write_rows(path: Path, n: int, seq: int) -> Path:
    """Rows of exactly `seq` tokens with the character tokenizer (1-char prompt, EOS at the end)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(path, "w") as f:
        for _ in range(n):
            body = "".join(rng.choice(letters) for _ in range(seq - 2))
            f.write(json.dumps({"prompt": "x", "completion": body}) + "\n")
    return path


def common_overrides(model: Path, rows: Path, seq: int) -> list[str]:
    return [
        f"model.name_or_path={model}", f"data.path=[{rows}]", f"data.max_length={seq}", "data.splits=[1,0,0]",
        "data.dedup=false", "data.near_dedup=false", "train.precision=bf16", "train.eval_generate=false",
        "train.export=last", "train.progress=false", "train.log_every=1", "train.lr_scheduler=constant",
        "train.warmup_steps=0",
    ]  # fmt: skip


def steady(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    vals = vals[len(vals) // 3 :] or vals  # skip warm-up steps (allocator, autotuning, compile)
    return statistics.median(vals) if vals else float("nan")


def memory_terms(overrides: list[str], world: int, micro: int, seq: int) -> dict:
    """The planner's per-rank bytes (GiB) for this config: what holds the memory."""
    from distft.config.load import load_config
    from distft.parallel.mesh import degrees
    from distft.plan.auto import plan_one
    from distft.plan.memory import activation_bytes, logits_bytes
    from distft.plan.shape import model_shape

    cfg, _ = load_config(overrides)
    shape = model_shape(cfg)
    e = plan_one(cfg, shape, cfg.strategy, world, micro, seq)
    act_bytes = 2.0 if cfg.train.precision in ("bf16", "fp16") else 4.0
    cp, tp = degrees(cfg.strategy)
    chunks = cfg.train.loss_chunks
    logits = logits_bytes(shape, micro * seq / cp, act_bytes, chunks) / tp  # as activation_bytes counts them
    style = getattr(cfg.strategy, "cp_style", "ulysses")
    acts = activation_bytes(shape, micro, seq, act_bytes, e.checkpointing, chunks, cp, tp, style)
    gib = 2**30
    return {
        "params": e.params / gib,
        "grads": e.grads / gib,
        "optimizer": e.optimizer / gib,
        "activations": (acts - logits) / gib,
        "logits": logits / gib,
        "buffers": (e.buffers + e.runtime) / gib,
        "total": e.total / gib,
    }


def result(what: str, rows: list[dict], peak_rows: list[dict], planner: dict, target: str) -> dict:
    """One table row: steady MFU and tokens/s of `rows`, the peak memory over `peak_rows`."""
    peak = max(r["mem_gib"] for r in peak_rows)
    out = {"what": what, "mfu": steady(rows, "mfu"), "tokens_per_s": steady(rows, "tokens_per_s")}
    return {**out, "peak_gib": peak, "planner_gib": planner, "target": target}


def run_job(a, run: Path, args: list[str], nproc: int, steps: int) -> list[dict]:
    """Train `steps` steps with a checkpoint and export at the end, then resume from it for
    RESUME_STEPS more (a second launch, resume=auto) and export again; the metrics rows of both."""
    shutil.rmtree(run, ignore_errors=True)
    env = bench_env(OMP_NUM_THREADS="8")
    first = [*args, f"output_dir={run}", f"train.max_steps={steps}", "resume=never"]
    launch("distft.train", first, nproc, run / "rss", run / "run.log", env=env)
    exported = sorted(p.name for p in (run / "export").iterdir())
    (run / "export").rename(run / "export_first")
    second = [*args, f"output_dir={run}", f"train.max_steps={steps + RESUME_STEPS}", "resume=auto"]
    launch("distft.train", second, nproc, run / "rss2", run / "resume.log", env=env)
    rows = [r for r in metrics(run) if "loss" in r]
    done = sorted({r["step"] for r in rows})
    if done != list(range(1, steps + RESUME_STEPS + 1)) or not (run / "export").is_dir():
        raise RuntimeError(
            f"{run}: steps {done} after the resume, export/ present: {(run / 'export').is_dir()}"
        )
    print(
        f"{run.name}: trained {steps}, exported {exported}, resumed to {steps + RESUME_STEPS}, exported again"
    )
    return rows


KERNELS = ["model.kernels=liger", "model.attn_implementation=flash_attention_2"]


def run_mfu(a, out: Path, gpus: int, kernels: bool = False) -> dict:
    model = write_model(out / "llama-1b", shrink(LLAMA_1B) if a.smoke else LLAMA_1B)
    rows = write_rows(out / "rows-1b.jsonl", max(64, a.micro * gpus * (a.steps + RESUME_STEPS + 2)), a.seq)
    args = [
        *common_overrides(model, rows, a.seq), "strategy=fsdp", "tuning=full",
        f"train.micro_batch_size={a.micro}", f"cluster.gpus_per_node={gpus}",
        f"cluster.nproc_per_node={gpus}", *(["train.compile=true"] if a.compile else []),
        *(["cluster.gpus_per_node=0"] if a.smoke else []), *(KERNELS if kernels else []),
    ]  # fmt: skip
    m = run_job(a, out / ("mfu-kernels" if kernels else "mfu"), args, gpus, a.steps)
    first = [r for r in m if r["step"] <= a.steps]
    what = f"Llama-1B shape, FSDP2 bf16, seq {a.seq}, micro {a.micro}, {gpus} GPU(s)"
    what += (", Liger + flash-attention 2" if kernels else "") + SMOKE * a.smoke
    r = result(what, first, m, memory_terms(args, gpus, a.micro, a.seq), "MFU >= 40%")
    return {**r, "ok": r["mfu"] >= 0.40}


def run_qlora(a, out: Path) -> dict:
    model = write_model(out / "llama-8b", shrink(LLAMA_8B) if a.smoke else LLAMA_8B)
    rows = write_rows(out / "rows-8b.jsonl", 64, a.seq)
    args = [
        *common_overrides(model, rows, a.seq), "strategy=ddp", "tuning=qlora",
        "train.gradient_checkpointing=true", "train.micro_batch_size=1",
        f"cluster.gpus_per_node={0 if a.smoke else 1}", "cluster.nproc_per_node=1",
    ]  # fmt: skip
    m = run_job(a, out / "qlora", args, 1, a.steps if a.smoke else 8)
    what = f"Llama-8B shape, QLoRA NF4 r=8, bf16, grad. checkpointing, seq {a.seq}, micro 1, 1 GPU"
    r = result(what + SMOKE * a.smoke, m, m, memory_terms(args, 1, 1, a.seq), "peak <= 8 GiB")
    return {**r, "ok": r["peak_gib"] <= 8.0}


def run_longctx(a, out: Path, gpus: int) -> dict:
    """Long context: rows of `--long-seq` tokens (32k by default) on the 1B shape, each sequence
    split over all GPUs (strategy.cp = GPUs), gradient checkpointing and chunked loss."""
    seq, nproc = a.long_seq, 2 if a.smoke else gpus
    model = write_model(out / f"llama-1b-{seq}", shrink(LLAMA_1B) if a.smoke else LLAMA_1B, positions=seq)
    rows = write_rows(out / f"rows-{seq}.jsonl", 16, seq)
    args = [
        *common_overrides(model, rows, seq), "strategy=fsdp", f"strategy.cp={nproc}",
        f"strategy.cp_style={a.cp_style}", "tuning=full", "train.gradient_checkpointing=true",
        "train.loss_chunks=8", "train.micro_batch_size=1", f"cluster.nproc_per_node={nproc}",
        f"cluster.gpus_per_node={0 if a.smoke else gpus}",
    ]  # fmt: skip
    m = run_job(a, out / "longctx", args, nproc, a.steps if a.smoke else 6)
    what = f"Llama-1B shape, {seq}-token rows, FSDP2 cp={nproc} ({a.cp_style}), bf16, grad. "
    what += f"checkpointing, loss chunks 8, micro 1, {nproc} GPU(s)" + SMOKE * a.smoke
    target = ">= 32k tokens per sequence trains, resumes, exports"
    return {**result(what, m, m, memory_terms(args, nproc, 1, seq), target), "ok": seq >= 32768}


def run_realistic(a, out: Path, gpus: int) -> list[dict]:
    """bench/realistic.py's rows and tokenizer on a 1B Llama shape (16 layers of 2048), packed rows of
    2048 tokens: one run per variant (plain, compile, Liger + flash-attention where installed)."""
    import importlib.util

    from realistic import build

    shape = argparse.Namespace(
        rows=400 if a.smoke else 20000, seed=0, vocab=8192, hidden=64 if a.smoke else 2048,
        layers=2 if a.smoke else 16, max_length=a.seq,
    )  # fmt: skip
    work = out / "realistic"
    if not (work / "model" / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        build(work, shape)
    flash = importlib.util.find_spec("flash_attn") is not None and not a.smoke
    args = [
        "model=hf", f"model.name_or_path={work / 'model'}", f"data.path=[{work / 'rows.jsonl'}]",
        f"data.max_length={a.seq}", "data.packing=true", "data.splits=[1,0,0]", "strategy=fsdp",
        "tuning=full",
        f"train.precision={'fp32' if a.smoke else 'bf16'}", f"train.micro_batch_size={a.micro}",
        "train.eval_generate=false", "train.eval_every=0", "train.export=last", "train.progress=false",
        "train.lr_scheduler=constant", "train.warmup_steps=0", f"cluster.nproc_per_node={gpus}",
        f"cluster.gpus_per_node={0 if a.smoke else gpus}",
        *(["model.attn_implementation=flash_attention_2"] if flash else []),
    ]  # fmt: skip
    variants = {"plain": []} if a.smoke else {"plain": [], "compile": ["train.compile=true"]}
    if importlib.util.find_spec("liger_kernel") and not a.smoke:
        variants["liger"] = ["model.kernels=liger"]
    results = []
    attn = "flash-attn varlen" if flash else "sdpa"
    planner = memory_terms(args, gpus, a.micro, a.seq)  # the variants change kernels, not memory terms
    for name, extra in variants.items():
        m = run_job(a, out / f"realistic-{name}", [*args, *extra], gpus, a.steps)
        first = [r for r in m if r["step"] <= a.steps]
        what = (
            f"realistic rows, Llama-1B shape, packed {a.seq}, {attn}, {name}, micro {a.micro}, {gpus} GPU(s)"
        )
        r = result(what + SMOKE * a.smoke, first, m, planner, "MFU >= 45%")
        results.append({**r, "ok": r["mfu"] >= 0.45})
    return results


def main() -> None:
    import torch

    a = parse()
    if not torch.cuda.is_available() and not a.smoke:
        raise SystemExit(
            "bench/gpu.py needs a CUDA GPU (this machine has none; --smoke checks the script on CPU)"
        )
    out = Path(a.out + ("-smoke" if a.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    gpus = a.gpus or torch.cuda.device_count()
    results = []
    if a.only in (None, "mfu"):
        results.append(run_mfu(a, out, gpus))
    if a.only in (None, "qlora"):
        results.append(run_qlora(a, out))
    if a.only in (None, "longctx"):
        results.append(run_longctx(a, out, gpus))
    if a.only in (None, "realistic"):
        results += run_realistic(a, out, max(gpus, 1))
    if a.only in (None, "kernels") and not a.smoke:  # with and without Liger and flash-attention
        import importlib.util

        if all(importlib.util.find_spec(m) for m in ("liger_kernel", "flash_attn")):
            if a.only == "kernels":
                results.append(run_mfu(a, out, gpus))
            results.append(run_mfu(a, out, gpus, kernels=True))
        else:
            print("kernels: skipped (pip install liger-kernel flash-attn to compare)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (--smoke: shapes shrunk)"
    lines = [
        f"device: {device}",
        "",
        "| run | MFU | tokens/s | peak GiB (allocated) | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['what']} | {r['mfu']:.1%} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
            f"{r['target']} | {'yes' if r['ok'] else 'no'} |"
        )
    terms = ["params", "grads", "optimizer", "activations", "logits", "buffers", "total"]
    lines += [
        "",
        "What holds the memory (the planner's per-rank terms for each run's config, GiB):",
        "",
        "| run | " + " | ".join(terms) + " | measured peak |",
        "|---|" + "---|" * (len(terms) + 1),
    ]
    for r in results:
        t = r["planner_gib"]
        lines.append(
            f"| {r['what'].split(',')[0]} | "
            + " | ".join(f"{t[k]:.2f}" for k in terms)
            + f" | {r['peak_gib']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
