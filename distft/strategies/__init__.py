"""Strategies, picked by `strategy=`: each module has `config`, `validate(cfg, gpu)` and
`make(cfg, info)`; the object it makes wraps the model and does backward, step, save, load."""

from types import ModuleType

from distft.strategies import auto, ddp, deepspeed_zero, fsdp, hsdp

STRATEGIES: dict[str, ModuleType] = {
    "ddp": ddp,
    "fsdp": fsdp,
    "hsdp": hsdp,
    "zero1": deepspeed_zero,
    "zero2": deepspeed_zero,
    "zero3": deepspeed_zero,
    "zero3_offload": deepspeed_zero,
    "auto": auto,  # resolved to one of the above by distft.plan while the config loads
}
