"""Deterministic train/val/test split: grouped by prompt, stratified by label for classification.

Rows that share a prompt (after cleaning: the same question with different answers) form one
group and land in one split, so no prompt is in two splits. Classification groups are stratified
by label with largest-remainder quotas; every label keeps at least one group in train.
"""

from __future__ import annotations

import math
import random

from distft.data.schemas import prompt_and_answer
from distft.errors import DataError

SPLITS = ("train", "val", "test")


def _targets(n: int, ratios: list[float]) -> list[int]:
    """Groups for val and test out of n (at least one each when its ratio > 0 and n >= 3)."""
    total = sum(ratios)
    out = []
    for r in ratios[1:]:
        k = int(n * r / total)
        if r > 0 and k == 0 and n >= 3:
            k = 1
        out.append(k)
    return out


def _quotas(sizes: dict, target: int, ratio: float, caps: dict) -> dict:
    """Largest-remainder share of `target` over strata of the given sizes, within caps."""
    total = sum(sizes.values())
    exact = {k: sizes[k] * ratio for k in sizes}
    q = {k: min(caps[k], math.floor(v)) for k, v in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - math.floor(exact[k])), str(k)))
    i = 0
    while sum(q.values()) < target and any(q[k] < caps[k] for k in sizes) and total:
        k = order[i % len(order)]
        if q[k] < caps[k]:
            q[k] += 1
        i += 1
    return q


def split_rows(
    rows: list[dict], ratios: list[float], seed: int, stratify: bool = True
) -> tuple[list[dict], list[dict], list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(prompt_and_answer(row)[0], []).append(row)
    keys = list(groups)
    classification = stratify and bool(rows) and all("label" in r and "text" in r for r in rows)
    strata: dict[str, list[str]] = {}
    for k in keys:
        label = str(groups[k][0]["label"]) if classification else ""
        strata.setdefault(label, []).append(k)
    for name in sorted(strata):
        random.Random(f"{seed}:{name}").shuffle(strata[name])

    n_val, n_test = _targets(len(keys), ratios)
    total = sum(ratios)
    sizes = {s: len(v) for s, v in strata.items()}
    caps = {s: n - 1 if classification else n for s, n in sizes.items()}  # one group stays in train
    val_q = _quotas(sizes, n_val, ratios[1] / total, caps)
    caps = {s: caps[s] - val_q[s] for s in sizes}
    test_q = _quotas(sizes, n_test, ratios[2] / total, caps)

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for s, ks in strata.items():
        cut = (val_q[s], val_q[s] + test_q[s])
        for i, k in enumerate(ks):
            part = "val" if i < cut[0] else "test" if i < cut[1] else "train"
            out[part] += groups[k]
    # Interleave strata in a seeded order (the sampler shuffles train again anyway).
    for s in SPLITS:
        random.Random(f"{seed}:order:{s}").shuffle(out[s])
    _check(out, ratios, len(rows))
    if classification:
        check_labels(out)
    return out["train"], out["val"], out["test"]


def _check(out: dict, ratios: list[float], n: int) -> None:
    for name, r in zip(SPLITS, ratios):
        if r > 0 and not out[name]:
            raise DataError(
                f"the {name} split would be empty: {n} rows after cleaning are too few for "
                f"data.splits={list(ratios)}; add data or set that ratio to 0 "
                "(e.g. data.splits=[8,1,0])"
            )


def check_labels(parts: dict[str, list[dict]]) -> None:
    """Every label in val/test must also be in train (a classifier cannot predict an unseen label)."""
    seen = {str(r["label"]) for r in parts["train"]}
    for name in ("val", "test"):
        for r in parts.get(name, []):
            if str(r["label"]) not in seen:
                raise DataError(
                    f"{r.get('_source', '?')}: label {r['label']!r} is in the {name} split but never in "
                    f"train (train labels: {sorted(seen)}); add training examples of it or remove it"
                )
