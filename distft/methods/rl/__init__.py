"""Reinforcement-learning building blocks shared by `method=ppo` and `method=grpo`: prompt data,
rollouts under sharded weights, rule-based and model rewards, advantage estimators, and the
models around the policy (SFT warm start, frozen reference, critic)."""
