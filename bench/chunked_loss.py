"""Peak memory of one forward + backward with and without chunked loss (`train.loss_chunks`) on a
32k-vocabulary Llama: the logits' share of the peak, chunked against unchunked.

    .venv/bin/python bench/chunked_loss.py                    # CPU: peak RSS per case
    .venv/bin/python bench/chunked_loss.py --device cuda      # GPU: torch.cuda.max_memory_allocated

Each case runs in its own process (glibc's mmap threshold pinned so freed blocks leave RSS). The
logits' share is a case's step peak minus that of `hidden` (the same forward and backward with a
loss on the final hidden states, no output projection); the ratio is chunked share / unchunked
share (target ≤ 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def case(mode: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.methods.logprobs import model_hidden, model_nll

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.arange(args.seq, device=device).repeat(args.batch, 1),
    }
    model_nll(model, {k: v[:, :16] for k, v in batch.items()}).backward()  # warm up kernels and grads
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before = _rss_gib()
    if mode == "hidden":
        hidden, _ = model_hidden(model, batch["input_ids"], batch["position_ids"])
        loss = hidden.float().square().sum()
    else:
        loss = model_nll(model, batch, args.chunks if mode == "chunked" else 0)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "step_peak_gib": peak - before, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "outputs/bench/chunked_loss.json"))
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args)))
        return
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    rows = {}
    for mode in ("hidden", "plain", "chunked"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", mode]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    base = rows["hidden"]["step_peak_gib"]
    share = {m: rows[m]["step_peak_gib"] - base for m in ("plain", "chunked")}
    logits_gib = args.batch * args.seq * args.vocab * 4 / 2**30
    result = {
        "args": vars(args),
        "rows": rows,
        "logits_fp32_gib": logits_gib,
        "share_plain_gib": share["plain"],
        "share_chunked_gib": share["chunked"],
        "ratio": share["chunked"] / share["plain"],
        "loss_rel_diff": abs(rows["chunked"]["loss"] - rows["plain"]["loss"]) / abs(rows["plain"]["loss"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "rows")}, indent=1))


if __name__ == "__main__":
    main()
