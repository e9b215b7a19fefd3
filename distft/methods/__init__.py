"""Training methods: each a class with `config`, `validate`, `default_rows`, `encode`, `collate`,
`loss` and `evaluate`, picked by name; the engine never branches on the method."""

from distft.methods.classify import Classify
from distft.methods.dpo import DPO
from distft.methods.grpo import GRPO
from distft.methods.kto import KTO
from distft.methods.ppo import PPO
from distft.methods.reward import Reward
from distft.methods.sft import SFT

METHODS: dict[str, type] = {
    "sft": SFT,
    "reward": Reward,
    "dpo": DPO,
    "kto": KTO,
    "ppo": PPO,
    "grpo": GRPO,
    "classify": Classify,
}
