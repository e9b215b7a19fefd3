"""Tuning modes as model transforms. Each module has `config`, `validate`, `load_kwargs`, `apply`
and `adapter`; the engine never branches on the mode's name."""

from types import ModuleType

from distft.tuning import adapter, dora, full, ia3, lora, prefix, qlora

TUNINGS: dict[str, ModuleType] = {
    "full": full,
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "ia3": ia3,
    "prefix": prefix,
    "adapter": adapter,
}
