"""The RL reference under adapter tunings when an SFT warm-up trained the adapter: the warm-started
policy, i.e. the base with the adapter as the warm-up left it (not the bare base: a KL to that
pulls the policy back past its warm start).

The warm-up adapter is kept as full tensors on every rank (an adapter is small); the reference
forward swaps them into the live, possibly sharded, adapter parameters and swaps the trained ones
back after, so there is one model in memory and the export stays the trained adapter. Checkpoints
hold the warm-up adapter (`reference_adapter.pt`), so a resumed run, on any world size, keeps its
reference."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

FILE = "reference_adapter.pt"


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _zero3(params: list) -> bool:
    return any(hasattr(p, "ds_id") for _, p in params)


@torch.no_grad()
def _read(params: list) -> dict[str, torch.Tensor]:
    """Full values of the parameters (a collective under FSDP2 / ZeRO-3), on the CPU."""
    from torch.distributed.tensor import DTensor

    if _zero3(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.data.detach().cpu().clone() for n, p in params}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).cpu().clone() for n, p in params}


@torch.no_grad()
def _write(params: list, values: dict[str, torch.Tensor]) -> None:
    """Set the parameters to full `values` (each rank keeps its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if _zero3(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for n, p in params:
                p.data.copy_(values[n])
        return
    for n, p in params:
        full = values[n].to(p.device, p.dtype)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
        else:
            p.data.copy_(full)


class WarmAdapter:
    """The warm-up adapter of `module` (a PeftModel, wrapped or sharded), taken when built."""

    def __init__(self, module: torch.nn.Module):
        self.params = _trainable(module)
        self.values = _read(self.params)

    @contextlib.contextmanager
    def active(self):
        """The module with the warm-up adapter in place of the trained one (for a no-grad forward)."""
        trained = _read(self.params)
        _write(self.params, self.values)
        try:
            yield
        finally:
            _write(self.params, trained)

    def save(self, path: Path, is_main: bool) -> None:
        if is_main:
            torch.save(self.values, path / FILE)

    def load(self, path: Path) -> bool:
        f = path / FILE
        if f.is_file():
            self.values = torch.load(f, map_location="cpu", weights_only=True)
        return f.is_file()
