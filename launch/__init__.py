"""distft-launch: starts a whole job from cluster= (local ranks, SLURM batch jobs, sweeps)."""

LAUNCHERS = {"local": "launch.local", "slurm": "launch.slurm"}
"""cluster= option -> the module that starts its ranks (imported on use)."""
