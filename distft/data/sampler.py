"""Global-batch sampler: the order of global batches depends on the seed, never on world size.

Each optimizer step takes one global batch (micro × accum × world examples) from a seeded
permutation of the epoch; rank r gets its contiguous share, split into accum micro-batches.
Resuming at step k jumps straight to its global batch (no skipping through data).
"""

from __future__ import annotations

import torch

from distft.errors import DataError


class GlobalBatchSampler:
    def __init__(self, num_examples: int, global_batch: int, seed: int):
        if num_examples < global_batch:
            raise DataError(
                f"the train split has {num_examples} examples but one global batch needs "
                f"{global_batch} (micro_batch_size × grad_accum × world size); add data or "
                "lower train.micro_batch_size / train.grad_accum"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return perm[i * self.global_batch : (i + 1) * self.global_batch]

    def rank_micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[int]]:
        batch = self.global_indices(step)
        share = len(batch) // world
        mine = batch[rank * share : (rank + 1) * share]
        micro = share // accum
        return [mine[j * micro : (j + 1) * micro] for j in range(accum)]
