"""Rebuild the shipped tiny pre-trained base: `python -m distft.tiny_pretrain [--out FILE]`.

Full SFT of the tiny Llama (model=tiny's shape and init) with distft's own engine, one process, on
general string tasks generated from SEED. Reverse and sort (the embedded default tasks) are left
out on purpose, so an adapter demo on the default data (model=tiny_pretrained tuning=lora) teaches
the base something new. The weights go to distft/models/tiny_pretrained.safetensors (fp32, ~2.6 MB)
with the seed, tasks, command and the held-out exact match in the file's metadata. Same torch
version and thread count (OMP_NUM_THREADS=1 on CPU) give the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 20261125
EXAMPLES = 24000
OVERRIDES = [
    "model=tiny",
    "tuning=full",
    "method=sft",
    "strategy=ddp",
    "train.epochs=5",
    "train.micro_batch_size=64",
    "train.lr=5e-3",
    f"train.seed={SEED}",
    "train.progress=false",
    "train.log_every=25",
    "data.near_dedup=false",
    "data.max_eval_generations=120",
    "logger=none",
    "resume=never",
]


def _shift(s: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


# General string tasks the base learns; none of them is reverse or sort (see default_tasks.TASKS).
TASKS = {
    "copy": lambda s: s,
    "upper": str.upper,
    "shift": _shift,
    "count": lambda s: str(len(s)),
    "first": lambda s: s[0],
    "last": lambda s: s[-1],
    "double": lambda s: "".join(c + c for c in s),
    "max": max,
    "min": min,
}


def pretrain_rows(n: int, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = rng.choice(sorted(TASKS))
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        rows.append({"prompt": f"{task} {word}=", "completion": TASKS[task](word)})
    return rows


def build(out: Path, workdir: Path) -> dict:
    """Train, then write the weights file; returns its metadata."""
    import torch
    from safetensors.torch import save_model
    from transformers import LlamaForCausalLM

    from distft.config.load import load_config
    from distft.data.default_tasks import TASKS as DEFAULT_TASKS
    from distft.models.tiny import SHAPE_KEYS

    assert not set(TASKS) & set(DEFAULT_TASKS), "the base must not learn the default demo tasks"
    data = workdir / "pretrain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pretrain_rows(EXAMPLES)))
    run = workdir / "run"
    overrides = [*OVERRIDES, f"data.path=[{data}]", f"output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "distft.train", *overrides], check=True, env=env)
    exact = json.loads((run / "eval.json").read_text())
    model = LlamaForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    model_cfg = load_config(["model=tiny"])[0].model
    metadata = {
        "seed": str(SEED),
        "examples": str(EXAMPLES),
        "tasks": json.dumps(sorted(TASKS)),
        "overrides": json.dumps(OVERRIDES),
        "command": "OMP_NUM_THREADS=1 python -m distft.tiny_pretrain",
        "torch": torch.__version__,
        "eval": json.dumps(exact),
        "shape": json.dumps({k: getattr(model_cfg, k) for k in SHAPE_KEYS}),
    }
    save_model(model, str(out), metadata=metadata)
    out.chmod(0o644)
    return metadata


def main(argv: list[str] | None = None) -> int:
    from distft.models.tiny import PRETRAINED_WEIGHTS

    parser = argparse.ArgumentParser(prog="python -m distft.tiny_pretrain", description=__doc__)
    parser.add_argument("--out", type=Path, default=PRETRAINED_WEIGHTS, help="weights file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distft-tiny-pretrain-") as tmp:
        meta = build(args.out, Path(tmp))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); eval: {meta['eval']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
