"""Tuning modes as model transforms. Each module has `config`, `validate`, `load_kwargs`, `apply`
and `adapter`; the engine never branches on the mode's name."""

from types import ModuleType

from distft.tuning import full, lora, qlora

TUNINGS: dict[str, ModuleType] = {"full": full, "lora": lora, "qlora": qlora}
