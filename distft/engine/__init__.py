"""The training engine: the loop, checkpoints, evaluation, export and metrics."""
