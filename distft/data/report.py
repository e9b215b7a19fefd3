"""The data quality report: data_report.json in the run dir and a table printed by rank 0."""

from __future__ import annotations

import math
from collections import Counter

from distft.data.schemas import completion_text

STAGES = [
    ("bad_lines", "malformed lines skipped"),
    ("empty", "empty rows"),
    ("too_short", "too short"),
    ("too_long", "too long"),
    ("filtered", "filtered by data.drop_patterns"),
    ("exact_duplicate", "exact duplicates"),
    ("near_duplicate", "near duplicates"),
]


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]

    return {"min": v[0], "p50": pct(50), "p90": pct(90), "p95": pct(95), "p99": pct(99), "max": v[-1]}


def label_stats(rows: list[dict], warn_ratio: float, labels: list | None = None) -> dict | None:
    if labels is None:
        if not rows or not all("label" in r and "text" in r for r in rows):
            return None
        labels = [str(r["label"]) for r in rows]
    if not labels:
        return None
    counts = Counter(labels)
    ratio = max(counts.values()) / min(counts.values())
    out = {"distribution": dict(sorted(counts.items())), "imbalance_ratio": round(ratio, 3)}
    if ratio > warn_ratio:
        rare = min(counts, key=counts.get)
        common = max(counts, key=counts.get)
        out["warning"] = (
            f"labels are imbalanced: {common!r} has {counts[common]} rows, {rare!r} only {counts[rare]} "
            f"({ratio:.1f}x > data.imbalance_warn_ratio={warn_ratio}); watch per-class recall/F1, "
            "add data for the rare labels or rebalance"
        )
    return out


def first_word(row: dict) -> str | None:
    words = completion_text(row).split()
    return words[0] if words else None


def first_tokens(rows: list[dict], top: int = 10, first_words: list | None = None) -> list[list]:
    """Most common first whitespace-separated tokens of the completions, with their share."""
    words = [w for w in (first_words if first_words is not None else map(first_word, rows)) if w is not None]
    if not words:
        return []
    return [[w, n, round(n / len(words), 4)] for w, n in Counter(words).most_common(top)]


def build(
    *,
    sources: list[dict],
    bad_lines: list[dict],
    cleaned,
    splits: dict[str, dict],
    mix: dict | None,
    max_length: int,
    warn_ratio: float,
    formats: dict[str, int],
) -> dict:
    counts = dict(cleaned.counts)
    drops = {k: dict(v) for k, v in cleaned.drops.items()}
    if bad_lines:
        drops["bad_line"] = {"count": len(bad_lines), "examples": bad_lines[:20]}
    counts = {"bad_lines": len(bad_lines), **counts}
    lengths = cleaned.lengths or []
    report = {
        "counts": counts,
        "duplicates_removed": counts["duplicates_removed"],
        "kept": counts["kept"],
        "rows": counts["kept"],
        "sources": sources,
        "formats": formats,
        "normalized_rows": cleaned.normalized,
        "pii_masked": cleaned.pii,
        "conflicting_prompts": cleaned.conflicts,
        "tokens": percentiles(lengths),
        "over_max_length": sum(n > max_length for n in lengths),
        "max_length": max_length,
        "truncated": sum(s.get("truncated", 0) for s in splits.values()),
        "splits": splits,
        "completion_first_tokens": first_tokens(cleaned.rows, first_words=cleaned.first_words),
        "drops": drops,
    }
    if mix is not None:
        report["mix"] = mix
    batched = cleaned.first_words is not None  # prepared batch by batch: labels given, None if not all
    labels = label_stats(cleaned.rows, warn_ratio, cleaned.labels) if not batched or cleaned.labels else None
    if labels is not None:
        report["labels"] = labels
    return report


def table(report: dict) -> str:
    """Human-readable summary of a report (printed by distft-data and at the start of training)."""
    c = report["counts"]
    lines = ["", "distft data report"]
    if report.get("streaming"):
        scanned = report["streaming"]["rows_scanned"]
        lines.append(f"  (data.streaming: the {scanned} rows scanned for val/test)")
    w = 34

    def row(name: str, value) -> None:
        lines.append(f"  {name:<{w}} {value}")

    loaded = c["loaded"]
    row("rows read", loaded + c.get("bad_lines", 0))
    left = loaded
    for key, label in STAGES:
        n = c.get(key, 0)
        if key != "bad_lines":
            left -= n
        row(f"- {label}", f"{n:>7}" + (f"   -> {left}" if key != "bad_lines" else ""))
    row("duplicates_removed", c["duplicates_removed"])
    row("kept", c["kept"])
    sp = report["splits"]
    sizes = " / ".join(str(sp.get(s, {}).get("rows", 0)) for s in ("train", "val", "test"))
    row("splits train / val / test", sizes)
    if report.get("mix"):
        row("train mix (rows per source)", ", ".join(f"{k}: {v}" for k, v in report["mix"].items()))
    t = report.get("tokens") or {}
    if t:
        row("tokens p50 / p90 / p99 / max", f"{t['p50']} / {t['p90']} / {t['p99']} / {t['max']}")
    row(f"over max_length={report['max_length']}", report["over_max_length"])
    row("truncated examples", report["truncated"])
    if report.get("packing"):
        p = report["packing"]
        row("packed sequences (non-padding)", f"{p['sequences']} ({p['efficiency']:.1%})")
    if report.get("normalized_rows"):
        row("rows changed by normalization", report["normalized_rows"])
    if report.get("pii_masked"):
        row("personal data masked", ", ".join(f"{k} {v}" for k, v in report["pii_masked"].items()))
    if report.get("conflicting_prompts"):
        row("prompts with differing answers", report["conflicting_prompts"])
    if report.get("completion_first_tokens"):
        top = report["completion_first_tokens"][:5]
        row("first tokens of completions", ", ".join(f"{w!r} {share:.1%}" for w, _, share in top))
    labels = report.get("labels")
    if labels:
        row("labels", ", ".join(f"{k}: {v}" for k, v in labels["distribution"].items()))
        if "warning" in labels:
            lines.append(f"  WARNING: {labels['warning']}")
    for reason, d in report["drops"].items():
        ex = d["examples"][0] if d["examples"] else None
        if ex:
            detail = ex.get("detail") or ex.get("error", "")
            lines.append(f"  dropped {reason}: {d['count']} (e.g. {ex['where']}: {detail})")
    return "\n".join(lines)
