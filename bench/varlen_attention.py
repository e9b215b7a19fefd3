"""One forward + backward of SFT's loss on packed rows: transformers' sdpa with its dense
block-diagonal mask against attention per packed example (distft.models.attention), alternating
in one process, repeated.

    .venv/bin/python bench/varlen_attention.py --model outputs/bench/realistic/model

The model is bench/realistic.py's (or any causal LM directory); the batch is `--rows` rows of
`--length` tokens packed (distft.data.collate.pack_bins) from examples whose lengths are drawn
log-normal as in the realistic work (median ~110 tokens). One thread (as a rank with
OMP_NUM_THREADS=1). Reported per side: wall and CPU seconds, min / median / max, the varlen/masked
ratios, and both losses (must agree).
"""

from __future__ import annotations

import argparse
import copy
import math
import random

import torch
from common import print_timings, spread, time_forward_backward


def packed_positions(rows: int, length: int, seed: int) -> torch.Tensor:
    """Position ids of `rows` packed rows: examples ~log-normal(110 tokens), best-fit packed."""
    from distft.data.collate import pack_bins

    rng = random.Random(seed)
    lengths = [int(min(length, max(20, rng.lognormvariate(math.log(110), 0.75)))) for _ in range(rows * 40)]
    out = []
    bins = pack_bins(lengths, length)
    for b in rng.sample(bins, rows):  # not the first bins: best-fit decreasing fills them with the longest
        pos = [p for i in b for p in range(lengths[i])]
        last = pos[-1]
        out.append(pos + list(range(last + 1, last + 1 + length - len(pos))))  # padding continues the run
    return torch.tensor(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from distft.methods.logprobs import model_nll
    from distft.models import attention

    masked = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    varlen = copy.deepcopy(masked)
    attention.register()
    varlen.set_attn_implementation(attention.ATTN)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, masked.config.vocab_size, (a.rows, a.length), generator=g)
    pos = packed_positions(a.rows, a.length, 0)
    labels = ids.clone()
    labels[:, ::2] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    sides = {"masked": lambda: model_nll(masked, batch), "varlen": lambda: model_nll(varlen, batch)}

    def zero_grad() -> None:
        masked.zero_grad(set_to_none=True)
        varlen.zero_grad(set_to_none=True)

    res, load = time_forward_backward(sides, a.repeats, zero_grad)
    examples = int((torch.diff(pos, dim=-1) != 1).sum()) + a.rows
    print(
        f"{a.rows} x {a.length} tokens packed from {examples} examples, {a.repeats} alternating repeats, "
        f"1 thread, 1-minute load {spread(load)}"
    )
    print_timings(res, "varlen", "masked")


if __name__ == "__main__":
    main()
