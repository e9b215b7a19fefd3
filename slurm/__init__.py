"""Shipped SLURM batch templates (installed as the distft_slurm package)."""
