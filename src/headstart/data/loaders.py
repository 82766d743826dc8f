"""Loaders: reproducible batches, and worker processes where they pay."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from headstart.data.transforms import BatchTransform, batched_transform
from headstart.errors import HeadstartError


def usable_cpus() -> int:
    """CPU cores this process may run on (container and ``taskset`` limits respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(dataset: Dataset) -> int:
    """Worker processes for ``dataset`` when the config says ``workers: null``.

    In-memory arrays (digits, CIFAR) and batch-transformed images get 0: their items cost
    microseconds to fetch, so worker start-up and inter-process transfer cost more than they
    save. Files and decoded images still resized per item get up to 4, leaving one core for the
    main process (0 on a single-core machine).
    """
    inner = getattr(dataset, "dataset", dataset)  # look through torch Subset
    if getattr(inner, "in_memory", False) or batched_transform(inner) is not None:
        return 0
    return max(0, min(4, usable_cpus() - 1))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random need the same so
    # random augmentations written with them are reproducible and differ between workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int | None,
    seed: int,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A reproducible DataLoader: the same seed gives the same order and augmentations.

    ``workers=None`` picks :func:`default_workers`. With a ``sampler`` the order is the
    sampler's and ``shuffle`` is ignored (give the sampler its own seeded generator).
    """
    if batch_size < 1:
        raise HeadstartError(f"data.batch_size must be at least 1, got {batch_size}")
    if workers is None:
        workers = default_workers(dataset)
    if workers < 0:
        raise HeadstartError(f"data.workers must be 0 or more (or none for automatic), got {workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    inner = getattr(dataset, "dataset", dataset)
    batched = batched_transform(inner)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        # Loaders are built per epoch (each epoch has its own seeded order), so workers cannot
        # outlive one; persistent workers would only hold memory.
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
    if batched is None:
        return loader
    return DeviceBatches(loader, batched, inner.batch_device, seed)  # type: ignore[return-value]


class DeviceBatches:
    """A loader of uint8 batches that yields them moved to ``device`` and transformed there."""

    def __init__(self, loader: DataLoader, transform: BatchTransform, device: torch.device, seed: int) -> None:
        self.loader, self.transform, self.device, self.seed = loader, transform, device, seed
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        # Each batch's draws are seeded by its position in the epoch, so a run resumed inside
        # an epoch (whose sampler skips the batches already trained) crops as it would have.
        skipped = getattr(self.loader.sampler, "skip", 0) // max(1, self.loader.batch_size or 1)
        for i, (x, y) in enumerate(self.loader, start=skipped):
            gen.manual_seed(self.seed * 1_000_003 + i)
            yield self.transform(x.to(self.device, non_blocking=True), gen), y
