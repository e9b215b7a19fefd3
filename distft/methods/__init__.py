"""Training methods: each a `distft.contracts.Method` (`config`, `validate`, `default_rows`,
`encode`, `collate`, `loss`, `evaluate`, optional hooks), picked by name; the engine never
branches on the method. RL building blocks shared by PPO and GRPO live in `distft.methods.rl`."""

from distft.contracts import Method
from distft.methods.classify import Classify
from distft.methods.distill import Distill
from distft.methods.dpo import DPO
from distft.methods.grpo import GRPO
from distft.methods.kto import KTO
from distft.methods.ppo import PPO
from distft.methods.reward import Reward
from distft.methods.sft import SFT

METHODS: dict[str, type[Method]] = {
    "sft": SFT,
    "reward": Reward,
    "dpo": DPO,
    "kto": KTO,
    "ppo": PPO,
    "grpo": GRPO,
    "classify": Classify,
    "distill": Distill,
}
