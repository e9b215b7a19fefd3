"""Embedded default SFT data: string tasks with one checkable answer (reverse and sort letters).

A 3-layer, width-128 Llama learns both to exact match within the default job's budget.
"""

from __future__ import annotations

import random
import string

TASKS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
}


def make_example(rng: random.Random) -> dict:
    task = rng.choice(sorted(TASKS))
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    return {"prompt": f"{task} {word}=", "completion": TASKS[task](word)}


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [make_example(rng) for _ in range(n)]
    for i, row in enumerate(rows):
        row["_source"] = f"<default sft data>:{i + 1}"
    return rows
