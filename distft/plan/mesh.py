"""Context- and tensor-parallel degrees for the FSDP2 family: the device mesh a job would use and
the smallest one that fits the memory budget when plain data parallelism does not.

Context parallelism (`strategy.cp`) splits each sequence over cp ranks, so activations per rank
fall by cp; tensor parallelism (`strategy.tp`) splits the projections, so a gathered block, the
activations and the vocabulary-sharded logits fall by tp. FSDP2 still shards the model states over
all ranks. Long sequences (activations dominate) get cp first, large models (states and gathered
buffers dominate) tp first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from distft.parallel.mesh import degrees
from distft.plan.memory import Estimate
from distft.plan.shape import ModelShape


@dataclass
class Mesh:
    dp: int
    cp: int
    tp: int
    cp_style: str = "ulysses"

    def __str__(self) -> str:
        return f"dp={self.dp} × cp={self.cp} × tp={self.tp}"

    def overrides(self) -> str:
        style = f" strategy.cp_style={self.cp_style}" if self.cp > 1 and self.cp_style != "ulysses" else ""
        return f"strategy.cp={self.cp}{style} strategy.tp={self.tp}"


def mesh_of(strategy_cfg, world: int) -> Mesh:
    """The mesh a strategy config asks for (cp and tp default to 1 where it has none)."""
    cp, tp = degrees(strategy_cfg)
    return Mesh(max(world // max(cp * tp, 1), 1), cp, tp, getattr(strategy_cfg, "cp_style", "ulysses"))


def with_degrees(strategy_cfg, cp: int, tp: int, cp_style: str | None = None):
    """A copy of a strategy config with cp / tp (and cp_style) set, whether or not its dataclass
    declares them."""
    out = copy.copy(strategy_cfg)
    object.__setattr__(out, "cp", cp)
    object.__setattr__(out, "tp", tp)
    if cp_style is not None:
        object.__setattr__(out, "cp_style", cp_style)
    return out


def candidates(shape: ModelShape, world: int, activation_heavy: bool) -> list[tuple[int, int]]:
    """(cp, tp) pairs whose product divides the world, tp dividing the attention and KV heads;
    fewest model-parallel ranks first (a sequence is padded to a multiple of cp)."""
    out = []
    for tp in range(1, world + 1):
        if world % tp or shape.heads % tp or shape.kv_heads % tp:
            continue
        for cp in range(1, world // tp + 1):
            if (world // tp) % cp:
                continue
            out.append((cp, tp))
    return sorted(out, key=lambda d: (d[0] * d[1], d[1] if activation_heavy else d[0]))


def suggest_mesh(plan, strategy_cfg, shape: ModelShape, world: int, seq: int, limit: float, valid=None):
    """The smallest (cp, tp) mesh whose estimate fits `limit`, as (Mesh, Estimate), or None.
    `plan(strategy_cfg) -> Estimate` prices one configuration; `valid(strategy_cfg) -> bool`, if
    given, skips meshes the job cannot run (the strategy's own validation)."""
    base: Estimate = plan(with_degrees(strategy_cfg, 1, 1))
    heavy = max(base.activations_ckpt if base.checkpointing else base.activations, 0) > base.states
    for cp, tp in candidates(shape, world, heavy):
        # Ulysses first; ring where the heads do not divide by cp (same activation memory, no condition)
        for style in ("ulysses", "ring") if cp > 1 else ("ulysses",):
            meshed = with_degrees(strategy_cfg, cp, tp, style)
            if valid is not None and not valid(meshed):
                continue
            est = plan(meshed)
            if est.total <= limit:
                return Mesh(world // (cp * tp), cp, tp, style), est
            break  # it fits no better in the other style
    return None
