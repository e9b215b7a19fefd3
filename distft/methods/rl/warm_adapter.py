"""The RL reference under adapter tunings when an SFT warm-up trained the adapter: the warm-started
policy, i.e. the base with the adapter as the warm-up left it (not the bare base: a KL to that
pulls the policy back past its warm start).

Each rank keeps its own shards of the warm-up adapter (an FSDP2 DTensor's local rows, a ZeRO-3
partition, or the whole tensor on a replica); the reference forward swaps them into the live
adapter parameters and swaps the trained ones back after, rank by rank with no collective, so
there is one model in memory and the export stays the trained adapter. Checkpoints hold the full
warm-up adapter (`reference_adapter.pt`), so a resumed run, on any world size, keeps its
reference: each rank cuts its shards from it."""

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


def _storage(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's own values of a parameter: a ZeRO-3 partition, a DTensor's local shard, or the
    tensor itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p.data


def _shard(p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full value, laid out as `_storage(p)` (no communication)."""
    if hasattr(p, "ds_tensor"):  # ZeRO-3: a padded slice of the flattened tensor, by rank
        size = p.ds_tensor.numel()
        start = torch.distributed.get_rank(group=p.ds_process_group) * size
        flat = full.flatten()[start : start + size]
        return torch.cat([flat, flat.new_zeros(size - flat.numel())])
    if hasattr(p, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    return full


class WarmAdapter:
    """The warm-up adapter of `module` (a PeftModel, wrapped or sharded), taken when built.
    `engine`: the DeepSpeed engine under ZeRO-3, whose gathered copies are released around a swap
    (they would otherwise outlive it holding the other adapter's values)."""

    def __init__(self, module: torch.nn.Module, engine=None):
        self.params = _trainable(module)
        self.values = _read(self.params)  # full, for checkpoints
        self.local = [_storage(p).detach().clone() for _, p in self.params]
        self.release = getattr(getattr(engine, "optimizer", None), "empty_partition_cache", None)
        if not _zero3(self.params):
            self.release = None

    @torch.no_grad()
    def _swap(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Put `values` (this rank's shards) in place; returns the ones they replaced."""
        if self.release is not None:
            self.release()  # ZeRO-3: no gathered copy keeps the values being swapped out
        out = []
        for (_, p), v in zip(self.params, values):
            local = _storage(p)
            out.append(local.detach().clone())
            local.copy_(v.to(local.device, local.dtype))
        return out

    @contextlib.contextmanager
    def active(self):
        """The module with the warm-up adapter in place of the trained one (for a no-grad forward)."""
        trained = self._swap(self.local)
        try:
            yield
        finally:
            self._swap(trained)

    def save(self, path: Path, is_main: bool) -> None:
        if is_main:
            torch.save(self.values, path / FILE)

    def load(self, path: Path) -> bool:
        f = path / FILE
        if f.is_file():
            self.values = torch.load(f, map_location="cpu", weights_only=True)
            self.local = [_shard(p, self.values[n]) for n, p in self.params]
        return f.is_file()
