"""Ranges of numeric config keys, declared next to each field (`lr: float = num(3e-3, gt=0)`).

A range lives in the field's metadata, so the schema, the check and the generated reference
(docs/reference/config.md, "allowed" column) read the same declaration. `check_ranges` walks a
dataclass and refuses the first value out of range in one line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distft.errors import ConfigError


@dataclass(frozen=True)
class Range:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    off: float | None = None
    """A value outside the range that switches the feature off (e.g. 0 for max_grad_norm)."""
    off_means: str = "off"
    """What `off` does, for the message ("0 to turn clipping off")."""
    also: tuple[str, ...] = ()
    """Words accepted besides numbers (micro_batch_size: auto)."""

    def ok(self, v: Any) -> bool:
        if v is None or v in self.also or (self.off is not None and v == self.off):
            return True
        if isinstance(v, list):
            return all(self.ok(x) for x in v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # NaN fails every bound
            return False
        return (
            (self.gt is None or v > self.gt)
            and (self.ge is None or v >= self.ge)
            and (self.lt is None or v < self.lt)
            and (self.le is None or v <= self.le)
        )

    def text(self) -> str:
        """'> 0', 'in [0, 1)', '>= 1 or auto', ... (also the reference page's 'allowed' cell)."""
        lo = (f"({_n(self.gt)}" if self.gt is not None else f"[{_n(self.ge)}") if self._lo() else None
        hi = (f"{_n(self.lt)})" if self.lt is not None else f"{_n(self.le)}]") if self._hi() else None
        if lo and hi:
            out = f"in {lo}, {hi}"
        elif lo:
            out = f"> {_n(self.gt)}" if self.gt is not None else f">= {_n(self.ge)}"
        else:
            out = f"< {_n(self.lt)}" if self.lt is not None else f"<= {_n(self.le)}"
        for word in self.also:
            out += f" or {word}"
        if self.off is not None:
            out += f", or {_n(self.off)} {self.off_means}"
        return out

    def _lo(self) -> bool:
        return self.gt is not None or self.ge is not None

    def _hi(self) -> bool:
        return self.lt is not None or self.le is not None


def _n(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def num(default: Any = dataclasses.MISSING, *, factory: Any = None, **bounds: Any) -> Any:
    """A dataclass field with a range: `max_grad_norm: float = num(1.0, gt=0, off=0)`."""
    meta = {"range": Range(**bounds)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def range_of(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


def check_ranges(obj: Any, where: str) -> None:
    """Refuse the first field of dataclass `obj` whose value is outside its declared range."""
    for f in dataclasses.fields(obj):
        r = range_of(f)
        value = getattr(obj, f.name)
        if r is not None and not r.ok(value):
            raise ConfigError(f"{where}.{f.name} must be {r.text()} (got {value!r})")
