"""The demo environment: a calculator tool the tiny policy learns to call.

A prompt is a product of two 2-digit numbers (`37*45`). The policy may answer at once (it cannot
multiply: partial credit at best) or call the tool, `[calc:37*45]`, read the result and copy it
(full credit). The SFT warm-up (`warmup_rows`) shows both ways, half each; RL then learns that
calling the tool pays: `env/tool_calls` and the reward rise.
"""

from __future__ import annotations

import random

from distft.methods.rl.env import EnvStep, ToolEnv
from distft.methods.rl.rewards import char_match


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * and parentheses.

    Args:
        expression: The expression, e.g. 37*45.
    """
    if not expression or set(expression) - set("0123456789+-*() "):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return str(eval(expression, {"__builtins__": {}}))  # only digits, operators and parentheses


class CalculatorEnv(ToolEnv):
    tools = [calc]

    def reset(self, row: dict):
        super().reset(row)
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, completion: str, message: dict) -> EnvStep:
        return super().step(completion, message)

    def score(self, answer: str, row: dict) -> float:
        """char_match of the answer against the product: 1 only for the exact result."""
        return char_match([answer], completion=[row["answer"]])[0]

    @staticmethod
    def default_rows(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            rows.append({"prompt": f"{a}*{b}", "answer": str(a * b), "_source": f"<calculator env>:{i + 1}"})
        return rows

    @staticmethod
    def warmup_rows(n: int, seed: int, tool_fraction: float = 0.5) -> list[dict]:
        """SFT demonstrations: a `tool_fraction` of them call the tool and copy its result, the
        rest answer at once (with the right product, which the tiny model cannot compute)."""
        rng = random.Random(seed)
        rows = []
        for row in CalculatorEnv.default_rows(n, seed):
            user = {"role": "user", "content": row["prompt"]}
            answer = {"role": "assistant", "content": row["answer"]}
            if rng.random() < tool_fraction:
                call = {"role": "assistant", "content": f"[calc:{row['prompt']}]"}
                tool = {"role": "tool", "name": "calc", "content": calc(row["prompt"])}
                rows.append({"messages": [user, call, tool, answer]})
            else:
                rows.append({"messages": [user, answer]})
        return rows
