"""Tuning modes as model transforms. Each module is a `distft.contracts.Tuning`: `config`,
`validate`, `load_kwargs`, `apply` and `adapter`; the engine never branches on the mode's name.
Which strategies a mode works with is the strategies' knowledge (`StrategyOption.supports_tuning`)."""

from distft.contracts import Tuning
from distft.tuning import adapter, dora, full, ia3, lora, prefix, qlora

TUNINGS: dict[str, Tuning] = {
    "full": full,
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "ia3": ia3,
    "prefix": prefix,
    "adapter": adapter,
}
