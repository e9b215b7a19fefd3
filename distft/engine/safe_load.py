"""Reading checkpoint files without running code from them.

A run dir may come from elsewhere (a shared filesystem, a copy), and pickle runs code. Our own
files load with `torch.load(weights_only=True)`; two libraries unpickle theirs:

- DeepSpeed loads with weights_only=False. Inside `weights_only_loads()` torch's
  TORCH_FORCE_WEIGHTS_ONLY_LOAD turns every such call into a weights-only load, with the few
  DeepSpeed types its checkpoints hold allowed (torch.serialization.safe_globals).
- DCP reads its `.metadata` with plain `pickle.load`: `check_dcp_metadata` first unpickles it with
  an allow-list of DCP's metadata types (Python's "restricting globals" pattern) and refuses it
  otherwise.

`python -m distft.engine.safe_load <module> [args]` runs a module (DeepSpeed's universal-checkpoint
converter) under the same rules. The sha256 manifest detects corruption, not tampering: this is
what keeps a tampered file from running code.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import runpy
import sys
from pathlib import Path

import torch

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# What DeepSpeed 0.19 stores besides tensors and containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 checkpoints).
DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside is weights-only, DeepSpeed's types allowed (restored after)."""
    before = os.environ.get(FORCE)
    os.environ[FORCE] = "1"
    allowed = [t for t in map(_resolve, DEEPSPEED_TYPES) if t is not None]
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE, None)
        else:
            os.environ[FORCE] = before


_TORCH_NAMES = {"Size", "device"} | {
    n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)
}
_PLAIN = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch.serialization", "_get_layout"),  # a layout by its name (torch.strided)
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        ok = module.startswith("torch.distributed.checkpoint.") or (module, name) in _PLAIN
        ok = ok or (module == "torch" and name in _TORCH_NAMES)
        if not ok:
            raise UnsafeCheckpointError(f"{module}.{name} is not a DCP metadata type")
        return super().find_class(module, name)


def check_dcp_metadata(dcp_dir: Path) -> str | None:
    """None when DCP's .metadata in `dcp_dir` holds only DCP's metadata types, else why not."""
    path = dcp_dir / ".metadata"
    if not path.is_file():
        return None
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpointError as e:
        return f"{path} refers to {e}: it could run code when loaded, so it is refused"
    except Exception as e:  # noqa: BLE001 - damaged: DCP's own load would fail too
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    return None


if __name__ == "__main__":
    # python -m distft.engine.safe_load <module> [args]: run <module> with weights-only loads.
    target, sys.argv = sys.argv[1], sys.argv[1:]
    with weights_only_loads():
        runpy.run_module(target, run_name="__main__", alter_sys=True)
