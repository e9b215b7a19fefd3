"""Shipped Hydra config groups (installed as the distft_conf package)."""
