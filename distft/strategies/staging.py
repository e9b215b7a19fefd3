"""Where an async checkpoint is staged before its background write: DCP's DefaultStager, with
pinned host buffers and non-blocking device-to-host copies on a GPU (kept between saves, so the
pinned memory is allocated once), plain host copies on CPU."""

from __future__ import annotations

import torch


def staging_options(device: torch.device):
    from torch.distributed.checkpoint.staging import StagingOptions

    gpu = device.type == "cuda"
    # Staging stays synchronous: the next optimizer step must not run before the copy is done.
    return StagingOptions(
        use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=gpu
    )


def stager(device: torch.device):
    from torch.distributed.checkpoint.staging import DefaultStager

    return DefaultStager(staging_options(device))
