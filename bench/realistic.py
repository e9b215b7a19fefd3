"""A realistic CPU fine-tune: distft's best settings against TRL's SFTTrainer (defaults and best).

    .venv/bin/python bench/realistic.py                          # 3 alternating repeats
    .venv/bin/python bench/realistic.py --repeats 1 --rows 600   # a quick look

The work (built once under --out, reused by every run):
- 3,000+ prompt/completion rows whose lengths spread like instruction data: prompt and completion
  word counts each log-normal, together ~20 to ~1,000 tokens. The text follows a random sparse
  bigram "language" (each word has a few likely successors), so there is something to learn and
  the loss falls well below log(vocabulary) within one epoch;
- a byte-level BPE tokenizer (~8k vocabulary) trained on the rows here with `tokenizers`;
- a Llama-shape model from its config (default ~17M parameters: width 384, 6 layers, untied head),
  random init (seed 0), saved once so both sides start from the same weights.

Sides (same rows, model, tokenizer, optimizer, lr schedule, max length 1024, fp32, ranks, strategy):
- distft: packing (first-fit-decreasing bins, attention kept inside each example), `--micro`
  packed rows per rank, everything else its defaults (data cleaning, export) with evals off;
- trl-default: SFTTrainer with its defaults (no packing, rows padded to the longest in the batch),
  micro-batch in rows chosen so a step holds the same number of tokens as a packed step;
- trl-best: SFTTrainer with `packing=True, packing_strategy="bfd"` (padding-free, position ids).

Reported per run: non-padding tokens/s of training (steady state: steps after the first 10%),
whole-job wall time (launch to exit), time to the end of the first optimizer step, peak RSS per
rank, last-10-steps and epoch-mean loss, and the saved model's loss on `--heldout` rows of the same
language kept out of training (bench/common.py heldout_loss: one function, tokenizer and
completion-only masking for every side; the sides train the same thing when it agrees within
HELDOUT_TOL); then ratios against each TRL side as min / median / max
over the repeats, the order of the sides rotating per repeat. Results: outputs/bench/realistic/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
from pathlib import Path

from common import REPO, heldout_loss, launch, load_average, metrics, spread
from trl_compare import distft_stamps, steady, trl_stamps

SIDES = ("distft", "trl-default", "trl-best")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=200, help="rows of the same language kept out of training")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--micro", type=int, default=4, help="packed rows of --max-length tokens per rank")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "outputs/bench/realistic"))
    p.add_argument("--distft-extra", default="", help="extra distft overrides, space separated")
    return p.parse_args(argv)


def make_rows(n: int, seed: int) -> list[dict]:
    """Prompt/completion rows in a sparse bigram language, lengths log-normal."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(5000)})
    succ = {w: rng.sample(words, 6) for w in words}
    weights = [1 / (k + 1) for k in range(6)]  # Zipf over each word's successors

    def chain(start: str, k: int) -> list[str]:
        out = [start]
        for _ in range(k - 1):
            out.append(rng.choices(succ[out[-1]], weights)[0])
        return out

    def count() -> int:
        return int(min(480, max(8, rng.lognormvariate(math.log(40), 0.9))))

    rows = []
    for _ in range(n):
        p, c = count(), count()
        text = chain(rng.choice(words), p + c)
        rows.append({"prompt": "Continue: " + " ".join(text[:p]), "completion": " " + " ".join(text[p:])})
    return rows


def bpe_tokenizer(texts, vocab: int):
    """A byte-level BPE tokenizer with `vocab` entries trained on `texts` (also bench/data_scale.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build(out: Path, a) -> tuple[Path, Path, float]:
    """The rows (JSONL), the model directory (tokenizer included) and the mean tokens per row."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    data, model_dir = out / "rows.jsonl", out / "model"
    rows = make_rows(a.rows + a.heldout, a.seed)  # the first a.rows rows do not depend on a.heldout
    rows, held = rows[: a.rows], rows[a.rows :]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    tokenizer = bpe_tokenizer((r["prompt"] + r["completion"] for r in rows), a.vocab)
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
        max_position_embeddings=a.max_length, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    lengths.sort()
    print(
        f"work: {len(rows)} rows, tokens per row p5/p50/p95/max {lengths[len(lengths) // 20]}/"
        f"{lengths[len(lengths) // 2]}/{lengths[len(lengths) * 19 // 20]}/{lengths[-1]}, mean "
        f"{statistics.mean(lengths):.0f}, total {sum(lengths)}; vocabulary {len(tokenizer)}; model "
        f"{params / 1e6:.1f}M parameters",
        flush=True,
    )
    return data, model_dir, statistics.mean(lengths)


def distft_args(a, work: dict, out: Path) -> list[str]:
    """distft's overrides for the realistic work (also bench/ab.py --realistic, whose runs each get
    a cache of their own: `work` without "cache")."""
    cache = work.get("cache") or out / "cache"
    return [
        f"output_dir={out}", "resume=never", "model=hf", f"model.name_or_path={work['model']}",
        f"data.path=[{work['data']}]", f"data.cache_dir={cache}", "data.splits=[1,0,0]",
        f"data.max_length={a.max_length}", "data.packing=true", "tuning=full", f"strategy={a.strategy}",
        "train.precision=fp32", "train.epochs=1", "train.eval_every=0", "train.eval_generate=false",
        "train.progress=false", f"train.micro_batch_size={a.micro}", "train.grad_accum=1",
        f"train.lr={a.lr}", f"train.warmup_steps={work['warmup']}", "train.lr_scheduler=cosine",
        *a.distft_extra.split(),
    ]  # fmt: skip


def run_distft(a, work: dict, out: Path) -> dict:
    res = launch("distft.train", distft_args(a, work, out), a.nproc, out / "rss", out / "run.log")
    rows = [r for r in metrics(out) if "loss" in r]
    tps, first = steady(distft_stamps(rows))
    losses = [r["loss"] for r in rows]
    mfu = [r["mfu"] for r in rows[len(rows) // 10 :] if r.get("mfu")]
    return {
        **res, "tokens_per_s": tps, "first_step_s": first - res["t0"],
        "final_loss": statistics.mean(losses[-10:]), "epoch_loss": statistics.mean(losses),
        "steps": len(rows), "mfu": statistics.median(mfu) if mfu else math.nan,
        "heldout_loss": heldout(work, out / "export"),
    }  # fmt: skip


def heldout(work: dict, model_dir: Path) -> float:
    """The trained model's loss on the held-out rows (bench/common.py: one function for every side)."""
    rows = [json.loads(x) for x in Path(work["heldout"]).read_text().splitlines() if x.strip()]
    return heldout_loss(model_dir, work["model"], rows) if rows else math.nan


def nan_if_none(x: float | None) -> float:
    """TRL logs no loss in a run shorter than its logging interval."""
    return math.nan if x is None else x


def run_trl(a, work: dict, out: Path, packing: str) -> dict:
    micro = a.micro if packing != "none" else work["rows_per_micro"]
    args = [
        "--model", str(work["model"]), "--out", str(out), "--data", str(work["data"]), "--packing", packing,
        "--strategy", a.strategy, "--precision", "fp32", "--micro", str(micro), "--accum", "1",
        "--lr", str(a.lr), "--warmup", str(work["warmup"]), "--max-length", str(a.max_length),
    ]  # fmt: skip
    res = launch("trl_sft", args, a.nproc, out / "rss", out / "run.log")
    t = json.loads((out / "bench_timing.json").read_text())
    stamps = trl_stamps(t["steps"])
    tps, first = steady(stamps)
    return {
        **res, "tokens_per_s": tps, "first_step_s": first - res["t0"],
        "final_loss": nan_if_none(t["last_logged_loss"]), "epoch_loss": t["train_loss"], "steps": len(stamps),
        "mfu": math.nan, "heldout_loss": heldout(work, out / "final"),
    }  # fmt: skip


def prepare(a, out: Path) -> dict:
    """Build the work under `out` and size the sides' batches."""
    out.mkdir(parents=True, exist_ok=True)
    data, model_dir, mean_len = build(out, a)
    tokens = sum(1 for _ in data.open()) * mean_len
    steps = max(1, int(tokens // (a.micro * a.max_length * a.nproc)))
    work = {
        "data": data, "model": model_dir, "warmup": max(1, steps // 20), "heldout": out / "heldout.jsonl",
        # TRL's defaults pad rows: as many rows per micro-batch as fill the packed rows' tokens
        "rows_per_micro": max(1, round(a.micro * a.max_length / mean_len)),
    }  # fmt: skip
    print(
        f"~{steps} optimizer steps per epoch; trl-default micro-batch {work['rows_per_micro']} rows",
        flush=True,
    )
    return work


def main() -> None:
    a = parse()
    out = Path(a.out)
    work = prepare(a, out)
    # distft's data cache is shared by the repeats of this invocation (new for each invocation), as
    # TRL's datasets cache is: load_dataset and its map results are keyed by the rows file written
    # above, so TRL's later repeats reuse its tokenization too.
    work["cache"] = out / "distft_data_cache"
    shutil.rmtree(work["cache"], ignore_errors=True)
    sides = a.sides.split(",")
    results: list[dict] = []
    for rep in range(a.repeats):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # rotate who goes first
        for side in order:
            run_dir = out / side
            shutil.rmtree(run_dir, ignore_errors=True)
            load = load_average()
            if side == "distft":
                r = run_distft(a, work, run_dir)
            else:
                r = run_trl(a, work, run_dir, "none" if side == "trl-default" else "bfd")
            r.update(side=side, repeat=rep, load_before=load)
            results.append(r)
            print(
                f"[{rep}] {side:11s} tok/s {r['tokens_per_s']:7.0f}  first step {r['first_step_s']:5.1f}s"
                f"  wall {r['wall_s']:6.1f}s  rss/rank {'/'.join(f'{x:.2f}' for x in r['rss_gib'])} GiB"
                f"  loss(last10) {r['final_loss']:.4f}  held-out {r['heldout_loss']:.4f}"
                f"  steps {r['steps']}  load {load:.1f}",
                flush=True,
            )
            (out / "results.json").write_text(
                json.dumps({"args": vars(a), "runs": results}, indent=1, default=str)
            )
    md = summarize(results, sides, a)
    (out / "results.md").write_text(md)
    print(md)


def summarize(results: list[dict], sides: list[str], a) -> str:
    def pick(side: str) -> list[dict]:
        return sorted((r for r in results if r["side"] == side), key=lambda r: r["repeat"])

    lines = [
        f"{a.nproc} ranks, strategy={a.strategy}, fp32, {a.rows} rows, max_length {a.max_length}, "
        f"packed micro {a.micro}; min / median / max over {a.repeats} repeats",
        "",
        "| side | tokens/s | whole job (s) | first step (s) | peak RSS/rank (GiB) | loss, last 10 "
        "| loss, epoch | held-out loss | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        rs = pick(side)
        lines.append(
            f"| {side} | {spread([r['tokens_per_s'] for r in rs])} | {spread([r['wall_s'] for r in rs])} | "
            f"{spread([r['first_step_s'] for r in rs])} | {spread([max(r['rss_gib']) for r in rs])} | "
            f"{spread([r['final_loss'] for r in rs])} | {spread([r['epoch_loss'] for r in rs])} | "
            f"{spread([r['heldout_loss'] for r in rs])} | {spread([r['mfu'] for r in rs])} |"
        )
    if "distft" in sides:
        lines += [
            "",
            "| distft against | tokens/s ratio | whole-job time ratio | first-step ratio "
            "| last-10 loss diff | held-out loss diff |",
            "|---|---|---|---|---|---|",
        ]
        for peer in (s for s in sides if s != "distft"):
            pairs = list(zip(pick("distft"), pick(peer)))
            lines.append(
                f"| {peer} | {spread([x['tokens_per_s'] / y['tokens_per_s'] for x, y in pairs])} | "
                f"{spread([x['wall_s'] / y['wall_s'] for x, y in pairs])} | "
                f"{spread([x['first_step_s'] / y['first_step_s'] for x, y in pairs])} | "
                f"{spread([x['final_loss'] - y['final_loss'] for x, y in pairs])} | "
                f"{spread([x['heldout_loss'] - y['heldout_loss'] for x, y in pairs])} |"
            )
    lines += targets(results, sides)
    lines += [
        "",
        f"1-minute load average before the runs: {spread([r['load_before'] for r in results])} (2 cores)",
    ]
    return "\n".join(lines) + "\n"


HELDOUT_TOL = 0.05
"""The sides train the same thing when their models' mean loss on the held-out rows (same rows,
tokenizer and completion-only scoring, bench/common.py heldout_loss) differs by at most this."""

# Issue 18's targets on this work: (label, peer side, metric, ratio bound, True when at least).
TARGETS = [
    ("tokens/s >= 1.3x TRL defaults", "trl-default", "tokens_per_s", 1.3, True),
    ("tokens/s >= 1.1x TRL best (bfd)", "trl-best", "tokens_per_s", 1.1, True),
    ("first step <= 0.6x TRL defaults", "trl-default", "first_step_s", 0.6, False),
    ("first step <= 0.6x TRL best (bfd)", "trl-best", "first_step_s", 0.6, False),
]


def targets(results: list[dict], sides: list[str]) -> list[str]:
    """The target table: each ratio's median over the repeats against its bound, met or not."""
    if "distft" not in sides:
        return []
    mine = sorted((r for r in results if r["side"] == "distft"), key=lambda r: r["repeat"])
    lines = ["", "| target | distft/peer (min / median / max) | met? |", "|---|---|---|"]
    for label, peer, key, bound, at_least in TARGETS:
        theirs = sorted((r for r in results if r["side"] == peer), key=lambda r: r["repeat"])
        ratios = [x[key] / y[key] for x, y in zip(mine, theirs)]
        if not ratios:
            lines.append(f"| {label} | {peer} not run | - |")
            continue
        median = statistics.median(ratios)
        met = median >= bound if at_least else median <= bound
        lines.append(f"| {label} | {spread(ratios)} | {'met' if met else 'not met'} |")
    for peer in (s for s in sides if s != "distft"):
        theirs = sorted((r for r in results if r["side"] == peer), key=lambda r: r["repeat"])
        diffs = [x["heldout_loss"] - y["heldout_loss"] for x, y in zip(mine, theirs)]
        if diffs:
            median = statistics.median(diffs)
            lines.append(
                f"| same training: held-out loss within ±{HELDOUT_TOL} nats of {peer} | "
                f"{spread(diffs)} (distft − peer) | {'met' if abs(median) <= HELDOUT_TOL else 'not met'} |"
            )
    mfu = [r["mfu"] for r in mine if r["mfu"] == r["mfu"]]
    if mfu:
        median = statistics.median(mfu)
        lines.append(
            f"| MFU >= 50% of the calibrated matmul ceiling | {spread([100 * m for m in mfu])} % "
            f"| {'met' if median >= 0.5 else 'not met'} |"
        )
    lines.append(
        "| whole job <= 0.8x TRL's on the short ZeRO-2 epoch | bench/trl_compare.py --tunings full "
        "--strategy zero2 --rows 2000 --micro 8 (whole job column) | see there |"
    )
    return lines


if __name__ == "__main__":
    main()
