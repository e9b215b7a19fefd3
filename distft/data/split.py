"""Deterministic train/val/test split: grouped by prompt, stratified by label for classification.

Rows that share a prompt (after cleaning: the same question with different answers) form one
group and land in one split, so no prompt is in two splits. Classification groups are stratified
by label with largest-remainder quotas; every label keeps at least one group in train.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

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
    classification = stratify and bool(rows) and all("label" in r and "text" in r for r in rows)
    labels = [str(r["label"]) for r in rows] if classification else None
    parts = split_indices([prompt_and_answer(r)[0] for r in rows], labels, ratios, seed, rows.__getitem__)
    return tuple([rows[i] for i in part] for part in parts)


def split_indices(
    keys: Sequence, labels: Sequence[str] | None, ratios: list[float], seed: int, row_at=None
) -> tuple[list[int], list[int], list[int]]:
    """Row indices of train, val and test. `keys[i]` is row i's group (its prompt, or any value
    equal exactly when the prompts are, e.g. a digest); `labels` (str) stratify classification
    rows, None for other rows. `row_at(i)` gives row i for error messages. Shuffles act on lists
    whose order and lengths do not depend on what the keys are, so digests split as prompts do."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    group_list = list(groups.values())
    del groups
    classification = labels is not None
    strata: dict[str, list[int]] = {}
    for g, members in enumerate(group_list):
        label = labels[members[0]] if classification else ""
        strata.setdefault(label, []).append(g)
    for name in sorted(strata):
        random.Random(f"{seed}:{name}").shuffle(strata[name])

    n_val, n_test = _targets(len(group_list), ratios)
    total = sum(ratios)
    sizes = {s: len(v) for s, v in strata.items()}
    caps = {s: n - 1 if classification else n for s, n in sizes.items()}  # one group stays in train
    val_q = _quotas(sizes, n_val, ratios[1] / total, caps)
    caps = {s: caps[s] - val_q[s] for s in sizes}
    test_q = _quotas(sizes, n_test, ratios[2] / total, caps)

    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for s, gs in strata.items():
        cut = (val_q[s], val_q[s] + test_q[s])
        for i, g in enumerate(gs):
            part = "val" if i < cut[0] else "test" if i < cut[1] else "train"
            out[part] += group_list[g]
    # Interleave strata in a seeded order (the sampler shuffles train again anyway).
    for s in SPLITS:
        random.Random(f"{seed}:order:{s}").shuffle(out[s])
    _check(out, ratios, len(keys))
    if classification:
        check_label_indices(out, labels, row_at)
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
    rows = [r for name in SPLITS for r in parts.get(name, [])]
    at, n = {}, 0
    for name in SPLITS:
        at[name] = list(range(n, n + len(parts.get(name, []))))
        n += len(at[name])
    check_label_indices(at, [str(r["label"]) for r in rows], rows.__getitem__)


def check_label_indices(parts: dict[str, list[int]], labels: Sequence[str], row_at) -> None:
    seen = {labels[i] for i in parts["train"]}
    for name in ("val", "test"):
        for i in parts.get(name, []):
            if labels[i] not in seen:
                r = row_at(i)
                raise DataError(
                    f"{r.get('_source', '?')}: label {r['label']!r} is in the {name} split but never in "
                    f"train (train labels: {sorted(seen)}); add training examples of it or remove it"
                )
