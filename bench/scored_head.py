"""One forward + backward of SFT's loss with the output head on every position against the head on
the scored positions only (distft.methods.logprobs), alternating in one process, repeated.

    .venv/bin/python bench/scored_head.py --model outputs/bench/ab_head/work/model

The model is bench/realistic.py's (or any causal LM directory); the batch is `--rows` packed rows of
`--length` tokens where prompts (unscored) and completions alternate in runs of `--span` tokens,
so about half the positions are scored, as in the realistic work. One thread (as a rank with
OMP_NUM_THREADS=1). Reported per side: wall and CPU seconds of forward + backward, min / median /
max, and the scored/full ratios; the loss of both sides (must agree).
"""

from __future__ import annotations

import argparse

import torch
from common import print_timings, spread, time_forward_backward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--span", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from distft.methods.logprobs import model_nll

    model = AutoModelForCausalLM.from_pretrained(a.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.rows, a.length), generator=g)
    labels = ids.clone()
    labels[:, (torch.arange(a.length) // a.span) % 2 == 0] = -100
    pos = torch.arange(a.length).repeat(a.rows, 1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    full_inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    sides = {
        "full": lambda: model_nll(model, batch, 0, full_inputs),  # explicit inputs: every position
        "scored": lambda: model_nll(model, batch),
    }
    res, load = time_forward_backward(sides, a.repeats, lambda: model.zero_grad(set_to_none=True))
    scored = float((labels[:, 1:] != -100).float().mean())
    print(
        f"{a.rows} x {a.length} tokens, {scored:.0%} scored, vocabulary {model.config.vocab_size}, "
        f"{a.repeats} alternating repeats, 1 thread, 1-minute load {spread(load)}"
    )
    print_timings(res, "scored", "full")


if __name__ == "__main__":
    main()
