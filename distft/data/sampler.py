"""Global-batch sampler: the order of global batches depends on the seed, never on world size.

Each optimizer step takes one global batch (micro × accum × world examples) from a seeded
permutation of the epoch; rank r gets its contiguous share, split into accum micro-batches.
Resuming at step k jumps straight to its global batch (no skipping through data).

With `lengths` (data.group_by_length), each run of GROUP global batches of the permutation is
sorted by length and cut into global batches again, in a seeded order: a micro-batch then holds
examples of similar length (less padding), and the global batches still do not depend on the
number of ranks.
"""

from __future__ import annotations

import torch

from distft.errors import DataError

GROUP = 64  # global batches sorted by length together


class GlobalBatchSampler:
    def __init__(self, num_examples: int, global_batch: int, seed: int, lengths=None):
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
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
        self._group_key: tuple[int, int] | None = None
        self._group: list[list[int]] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        if self.lengths is None:
            return perm[i * self.global_batch : (i + 1) * self.global_batch]
        g, j = divmod(i, GROUP)
        if self._group_key != (epoch, g):
            end = min((g + 1) * GROUP, self.steps_per_epoch) * self.global_batch
            idx = torch.tensor(perm[g * GROUP * self.global_batch : end], dtype=torch.int64)
            idx = idx[torch.argsort(-self.lengths[idx], stable=True)].tolist()
            batches = [idx[k : k + self.global_batch] for k in range(0, len(idx), self.global_batch)]
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch * 7919 + g + 1)
            self._group = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
            self._group_key = (epoch, g)
        return self._group[j]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def checkpoint_state(self) -> dict:
        return {}  # the order is a function of the seed and the step

    def rank_examples(self, step: int, rank: int, world: int, accum: int, train) -> list[list[dict]]:
        return [[train[i] for i in ids] for ids in self.rank_micro_batches(step, rank, world, accum)]

    def rank_micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[int]]:
        batch = self.global_indices(step)
        share = len(batch) // world
        mine = batch[rank * share : (rank + 1) * share]
        micro = share // accum
        return [mine[j * micro : (j + 1) * micro] for j in range(accum)]


def make_sampler(cfg, data, global_batch: int, start_step: int, saved: dict):
    """The run's sampler: over the prepared train split, or over the stream (data.streaming)
    positioned where the checkpoint `saved` (its trainer_state) left it."""
    if getattr(data, "stream", None) is not None:
        from distft.data.stream_sampler import StreamSampler

        if start_step and "data_stream" not in saved:
            raise DataError(
                "resume: the checkpoint has no data stream position (it was not written with "
                "data.streaming=true); resume with data.streaming=false or start over (resume=never)"
            )
        return StreamSampler(data.stream, global_batch, start_step, saved.get("data_stream"))
    lengths = data.train.lengths() if cfg.data.group_by_length else None  # data's Rows: no decode
    return GlobalBatchSampler(len(data.train), global_batch, cfg.train.seed, lengths)
