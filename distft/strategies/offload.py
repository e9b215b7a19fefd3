"""Activation offloading (`train.activation_offload`): the tensors autograd saves for backward
are copied to host memory during forward (pinned, asynchronous on CUDA) and brought back when
backward needs them. Parameters (FSDP2's gathered weights, ZeRO-3's partitioned ones), tensor
subclasses and tensors already on the host stay where they are, so on CPU nothing moves and
memory does not change. Under gradient checkpointing only what the checkpoints save (each
block's input) passes through these hooks; the recomputed activations stay on the device.

    offload = ActivationOffload(device_type)
    with offload:
        loss = model(...)          # offload.packed / .moved count the saved tensors
    loss.backward()                # unpacked on demand, outside the context too
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks


class ActivationOffload(saved_tensors_hooks):
    def __init__(self, device_type: str) -> None:
        self.packed = 0  # tensors autograd saved under the hooks
        self.moved = 0  # of those, copied to host memory
        self.moved_bytes = 0
        pin = device_type == "cuda" and torch.cuda.is_available()

        def pack(t: torch.Tensor):
            self.packed += 1
            if t.device.type == "cpu" or isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor:
                return None, t
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            self.moved += 1
            self.moved_bytes += t.numel() * t.element_size()
            return t.device, host

        def unpack(packed) -> torch.Tensor:
            device, t = packed
            return t if device is None else t.to(device, non_blocking=pin)

        super().__init__(pack, unpack)

    def parts(self) -> dict[str, tuple[float, float]]:
        """Metrics of one forward as {name: (sum, count)}: saved tensors under the hooks and GiB
        moved to host memory."""
        return {"offload/tensors": (self.packed, 1), "offload/host_gib": (self.moved_bytes / 2**30, 1)}


def activation_offload(strategy) -> ActivationOffload | None:
    """The offload context for a strategy's forward passes, or None when it is off."""
    cfg = getattr(strategy, "cfg", None)
    if cfg is None or not cfg.train.activation_offload:
        return None
    device = getattr(getattr(strategy, "info", None), "device", None)
    return ActivationOffload(device.type if device is not None else "cpu")
