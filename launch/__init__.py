"""distft-launch: starts a whole job from cluster= (local ranks, SLURM batch jobs, sweeps)."""
