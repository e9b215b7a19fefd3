"""Where each rank of a context-parallel group holds its part of a sequence (`chunks_of`,
`positions_index`), and the state of the split forward running now (`STATE`, `segments`): shared
by the context-parallel hooks and attention functions (cp.py) and ring attention (ring.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _State:
    group: object = None  # the context-parallel process group while a training forward runs
    size: int = 1
    rank: int = 0
    whole: bool = False  # inputs come whole: split in the forward, logits gathered after it
    balanced: bool = False  # each rank holds chunks r and 2n-1-r of 2n (chunks_of)
    width: int = 0  # whole mode: the row length of the current forward
    positions: torch.Tensor | None = None  # global position ids of the current forward (B, L)
    masks: dict = field(default_factory=dict)  # sliding window (or None) -> mask; "seg", "causal"


STATE = _State()


def chunk_count(size: int, balanced: bool) -> int:
    """How many chunks a sequence is cut into for a cp group of `size` ranks."""
    return 2 * size if balanced else size


def chunks_of(rank: int, size: int, balanced: bool) -> list[int]:
    """The sequence chunks a rank of a cp group holds: chunk `rank` of `size` (contiguous), or
    (balanced, for causal masks) chunks `rank` and `2·size − 1 − rank` of 2·size, so every rank
    has as many early as late positions to attend from."""
    return [rank, 2 * size - 1 - rank] if balanced else [rank]


def positions_index(width: int, rank: int, size: int, balanced: bool, device=None) -> torch.Tensor:
    """Indices into a row padded to a multiple of the chunk count of the positions `rank` holds."""
    h = width // chunk_count(size, balanced)
    return torch.cat([torch.arange(c * h, c * h + h, device=device) for c in chunks_of(rank, size, balanced)])


def segments() -> torch.Tensor:
    """(B, L) example index of every position of the current forward's whole sequence: a position
    id that does not continue the previous one starts a packed example."""
    if "seg" not in STATE.masks:
        pos = STATE.positions
        STATE.masks["seg"] = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    return STATE.masks["seg"]
