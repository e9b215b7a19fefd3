"""Training methods: each a `distft.contracts.Method` (`config`, `validate`, `default_rows`,
`encode`, `collate`, `loss`, `evaluate`, optional hooks), picked by name; the engine never
branches on the method. RL building blocks shared by PPO and GRPO live in `distft.methods.rl`.

The registry imports a method's module when it is first looked up: an SFT job does not pay for
importing the RL methods (and, through them, TRL's trainer stack) at start-up."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from distft.contracts import Method

_WHERE = {
    "sft": "distft.methods.sft:SFT",
    "reward": "distft.methods.reward:Reward",
    "dpo": "distft.methods.dpo:DPO",
    "kto": "distft.methods.kto:KTO",
    "ppo": "distft.methods.ppo:PPO",
    "grpo": "distft.methods.grpo:GRPO",
    "classify": "distft.methods.classify:Classify",
    "distill": "distft.methods.distill:Distill",
}


class _Registry(Mapping[str, type[Method]]):
    """name -> Method class, imported on first lookup."""

    def __getitem__(self, name: str) -> type[Method]:
        module, attr = _WHERE[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)


METHODS: Mapping[str, type[Method]] = _Registry()
