"""Data preparation at scale: distft's Arrow pipeline against TRL's SFTTrainer preparation.

    python bench/data_scale.py --rows 10000 100000 [--num-proc 2] [--out /tmp/data_scale] [--tokenizer bpe]

For each row count, on the same generated prompt/completion JSONL (tiny model, character
tokenizer or with --tokenizer bpe an ~8k byte-level BPE trained as bench/realistic.py trains it,
data.max_length=512):
  distft prepare   `distft-data` into a fresh data.cache_dir: wall, peak RSS, cache size (the
                   default cleaning: normalization, exact and near dedup) and once more with the
                   cleaning off (the same work TRL does: tokenize and mask)
  TRL prepare      `SFTTrainer(...)` construction, which tokenizes the dataset with datasets.map
                   (dataset_num_proc = the same num_proc) into a fresh HF datasets cache
  distft training  2 ranks (torchrun), 2 steps on the warm cache: time from launch to the first
                   step's log line, and each rank's peak RSS
  distft streaming the same 2-rank, 2-step run with data.streaming=true straight from the JSONL
                   (no preparation): time to the first step, each rank's peak RSS
Every process runs through bench/rss.py (its own peak RSS at exit). Timings on a shared machine
are noisy: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH, REPO, bench_env, build_model_dir, launch, load_average, metrics

_RNG = random.Random(1234)
WORDS = ["".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + i % 7)) for i in range(5000)]


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """n prompt/completion rows of ~360 bytes (lengths spread 60 to 700), all distinct."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(8, 100))
            cut = max(1, len(words) // 3)
            prompt, completion = f"#{i} " + " ".join(words[:cut]) + " =", " " + " ".join(words[cut:])
            row = {"prompt": prompt, "completion": completion}
            f.write(json.dumps(row) + "\n")
    return path


def bpe_model_dir(out: Path, vocab: int) -> Path:
    """The tiny model with bench/realistic.py's byte-level BPE tokenizer (`vocab` entries, trained
    on the first 20k generated rows, which every row count shares), its embeddings resized to it."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(BENCH))  # realistic.py imports its neighbours as top-level modules
    from realistic import bpe_tokenizer

    sample = generate(out.with_name("bpe_sample.jsonl"), 20_000)
    with open(sample) as f:
        tok = bpe_tokenizer((r["prompt"] + r["completion"] for r in map(json.loads, f)), vocab)
    model = AutoModelForCausalLM.from_pretrained(build_model_dir(out.with_name("model")))
    model.resize_token_embeddings(len(tok))
    for c in (model.config, model.generation_config):
        c.pad_token_id, c.eos_token_id, c.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _timed(cmd: list[str], rss_dir: Path, log: Path, env: dict) -> dict:
    env = dict(env, BENCH_RSS_DIR=str(rss_dir), RANK="0")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({rc}); log {log}:\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gib": json.loads((rss_dir / "rank0.json").read_text())["peak_rss_gib"],
    }


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def distft_prepare(data: Path, model: Path, work: Path, num_proc: int, clean: bool) -> dict:
    cache, run = work / "cache", work / "run"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    args = [
        "model=hf", f"model.name_or_path={model}", f"data.path=[{data}]", "data.max_length=512",
        f"data.cache_dir={cache}", f"output_dir={run}", f"data.num_proc={num_proc}",
    ]  # fmt: skip
    if not clean:
        args += [
            "data.dedup=false", "data.near_dedup=false",
            "data.normalize_unicode=false", "data.normalize_whitespace=false",
        ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH / "rss.py"), "distft.data_cli", *args]
    out = _timed(cmd, work / "rss", work / "prep.log", bench_env())
    out["cache_mb"] = round(du(cache) / 2**20, 1)
    out["cache_files_mb"] = {  # per file of the entry (data/: the cleaned rows as JSONL)
        f.name: round(du(f) / 2**20 if f.is_dir() else f.stat().st_size / 2**20, 1)
        for entry in cache.iterdir()
        if entry.is_dir()
        for f in entry.iterdir()
    }
    out["args"] = args
    return out


def trl_prep_here(data: str, model_dir: str, out: str, num_proc: int) -> None:
    """What TRL users run: load the JSONL with datasets and build an SFTTrainer (it tokenizes)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_dataset("json", data_files=data, split="train")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=out, max_length=512, dataset_num_proc=num_proc, report_to="none", packing=False,
        bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def trl_prepare(data: Path, model: Path, work: Path, num_proc: int) -> dict:
    hf_cache = work / "hf_cache"
    shutil.rmtree(hf_cache, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(HF_DATASETS_CACHE=str(hf_cache), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(BENCH / "rss.py"), "bench.data_scale", "--trl-prep"]
    cmd += [str(data), str(model), str(work / "trl_out"), str(num_proc)]
    out = _timed(cmd, work / "rss", work / "trl.log", env)
    out["cache_mb"] = round(du(hf_cache) / 2**20, 1)
    shutil.rmtree(hf_cache, ignore_errors=True)  # 13 GB at 1M rows: measured, not kept
    return out


TWO_STEPS = [
    "train.max_steps=2", "train.micro_batch_size=8", "train.eval_every=0", "train.eval_generate=false",
    "eval.test=false", "train.export=none", "data.max_eval_examples=64", "train.progress=false",
]  # fmt: skip


def _two_steps(args: list[str], run: Path, work: Path, name: str) -> dict:
    """2 ranks, 2 steps: time from launch to the first step's log line, each rank's peak RSS."""
    shutil.rmtree(run, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    res = launch(
        "distft.train",
        [*args, f"output_dir={run}", *TWO_STEPS],
        2,
        work / f"rss_{name}",
        work / f"{name}.log",
    )
    first = metrics(run)[0]
    return {
        "first_step_s": round(first["time"] - res["t0"], 1),
        "rank_rss_gib": [round(x, 3) for x in res["rss_gib"]],
    }


def distft_train(data: Path, model: Path, work: Path, prep_args: list[str]) -> dict:
    args = [a for a in prep_args if not a.startswith("output_dir=")]
    return _two_steps(args, work / "train_run", work, "train")


def distft_stream(data: Path, model: Path, work: Path) -> dict:
    """data.streaming=true: no preparation, straight from the JSONL."""
    args = ["model=hf", f"model.name_or_path={model}", f"data.path=[{data}]", "data.max_length=512"]
    return _two_steps([*args, "data.streaming=true"], work / "stream_run", work, "stream")


def main() -> None:
    if sys.argv[1:2] == ["--trl-prep"]:
        data, model_dir, out, num_proc = sys.argv[2:6]
        return trl_prep_here(data, model_dir, out, int(num_proc))
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/distft_data_scale"))
    ap.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="bpe: an ~8k BPE")
    ap.add_argument("--bpe-vocab", type=int, default=8000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["clean", "raw", "trl", "train", "stream"])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tokenizer == "bpe":
        model = bpe_model_dir(a.out / f"model_bpe{a.bpe_vocab}", a.bpe_vocab)
    else:
        model = build_model_dir(a.out / "model")
    results = []
    for n in a.rows:
        work = a.out / f"rows{n}"
        work.mkdir(exist_ok=True)
        data = generate(work / "train.jsonl", n)
        row = {"rows": n, "jsonl_mb": round(data.stat().st_size / 2**20, 1), "tokenizer": a.tokenizer}
        row["load_before"] = round(load_average(), 1)
        if "clean" not in a.skip:
            row["distft_clean"] = distft_prepare(data, model, work / "d_clean", a.num_proc, True)
        if "raw" not in a.skip:
            row["distft_raw"] = distft_prepare(data, model, work / "d_raw", a.num_proc, False)
        if "trl" not in a.skip:
            row["trl"] = trl_prepare(data, model, work / "trl", a.num_proc)
        if "train" not in a.skip:
            prep = row.get("distft_raw") or row.get("distft_clean")
            where = work / ("d_raw" if "distft_raw" in row else "d_clean")
            row["train"] = distft_train(data, model, where, prep["args"])
        if "stream" not in a.skip:
            row["stream"] = distft_stream(data, model, work / "stream")
        for k in ("distft_clean", "distft_raw"):
            row.get(k, {}).pop("args", None)
        row["load_after"] = round(load_average(), 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
