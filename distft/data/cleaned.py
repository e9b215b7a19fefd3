"""What cleaning decided (`Cleaned`): the kept rows, their counts and a few examples of each drop
reason, shared by the whole-list cleaner (clean.py), near-dedup (near_dedup.py) and the batched
preparation."""

from __future__ import annotations

from dataclasses import dataclass, field

EXAMPLES_PER_REASON = 20


@dataclass
class Cleaned:
    rows: list[dict]
    lengths: list[int] | None
    """Token lengths of the kept rows (when a length function was given)."""
    counts: dict[str, int]
    """loaded, empty, too_short, too_long, filtered, exact_duplicates, near_duplicates, kept, ..."""
    drops: dict[str, dict] = field(default_factory=dict)
    """reason → {"count": n, "examples": [{"where": ..., "detail": ...}, ...]}"""
    pii: dict[str, int] = field(default_factory=dict)
    normalized: int = 0
    conflicts: int = 0
    """Prompts that appear with different answers (kept; such rows stay in one split)."""
    first_words: list | None = None
    """First word of each kept row's completion (None: none), when computed batch by batch."""
    labels: list | None = None
    """Each kept row's label (str) when every kept row is a classification row, batch by batch."""

    def drop(self, reason: str, row: dict, detail: str = "") -> None:
        d = self.drops.setdefault(reason, {"count": 0, "examples": []})
        d["count"] += 1
        if len(d["examples"]) < EXAMPLES_PER_REASON:
            d["examples"].append({"where": row.get("_source", "?"), "detail": detail})
