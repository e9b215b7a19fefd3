"""OmegaConf resolvers the shipped YAML uses, registered on import. Every process that composes
conf/ imports this module: ranks through distft.config.load, sweep trials (also inside submitit's
SLURM jobs, which unpickle launch.sweep.trial) through launch.sweep."""

from __future__ import annotations

from omegaconf import OmegaConf

# conf/cluster: cluster.nproc_per_node defaults to one rank per GPU on GPU nodes, 2 on CPU nodes.
OmegaConf.register_new_resolver(
    "distft_ranks_per_node", lambda gpus: int(gpus) if int(gpus) > 0 else 2, replace=True
)
# hydra/launcher settings: 0 means "let SLURM decide" (None).
OmegaConf.register_new_resolver(
    "distft_none_if_zero", lambda n: None if int(n) == 0 else int(n), replace=True
)
