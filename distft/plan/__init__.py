"""The memory planner: per-rank memory estimates for each strategy and world size, the strategy
and micro-batch choices behind `strategy=auto` and `train.micro_batch_size=auto`, `distft-plan`."""

from distft.plan.memory import Estimate, estimate
from distft.plan.shape import ModelShape, model_shape

__all__ = ["Estimate", "ModelShape", "estimate", "model_shape"]
