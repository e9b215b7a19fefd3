"""What the RL test files share: the user reward functions the runs name by import path, and helpers
that read an RL run's metrics (the `one_thread` and `tiny` fixtures are in tests/conftest.py)."""

from __future__ import annotations

from tests.util import metrics


# ---------------------------------------------------------------------- user rewards (by import path)
def flaky_reward(completions, prompts, **kw):
    """A user reward that raises on some rows and returns NaN on others (deterministic by prompt)."""
    out = []
    for p in prompts:
        if "z" in p:
            raise RuntimeError("boom")
        out.append(float("nan") if "q" in p else 0.0)
    return out


def always_raises(completions, **kw):
    raise RuntimeError("reward service unavailable")


def length_reward(completions, **kw):
    return [float(len(c)) for c in completions]


# ---------------------------------------------------------------------- reading runs
def rows_with(run_dir, key: str) -> list[dict]:
    return [r for r in metrics(run_dir) if key in r]


def rewards(run_dir) -> list[float]:
    return [r["reward"] for r in rows_with(run_dir, "reward")]


def tenths(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last tenth (at least one value each)."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n
