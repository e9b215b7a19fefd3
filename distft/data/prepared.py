"""What data preparation hands the engine: encoded splits, held-out rows and the data report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PreparedData:
    """Encoded examples per split and the canonical val/test rows (for generation eval): Python
    lists while rank 0 prepares, memory-mapped `Rows` (read-only sequences) once cached."""

    train: Sequence[dict]
    val: Sequence[dict]
    test: Sequence[dict]
    val_rows: Sequence[dict]
    test_rows: Sequence[dict]
    report: dict = field(default_factory=dict)
    split_rows: dict = field(default_factory=dict)
    """Cleaned rows per split (written to data/*.jsonl of the cache entry; not loaded back)."""
    stream: object = None
    """data.streaming: opens the train stream for a number of lanes (distft.data.stream.Stream.open);
    `train` is then a sample of it."""

    @property
    def metrics(self) -> dict[str, float]:
        """Constant per run, logged with every step: packing/efficiency when packing."""
        packing = self.report.get("packing")
        return {"packing/efficiency": packing["efficiency"]} if packing else {}
