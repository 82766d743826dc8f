"""Loaders: reproducible batches, worker processes where they pay, and errors that stay one line.

:func:`make_loader` builds a seeded :class:`torch.utils.data.DataLoader`. An exception raised
while a worker process loads an item would reach the main process rewritten by torch as
``Caught HeadstartError in DataLoader worker process 0. Original Traceback ...``, the worker's
whole traceback folded into the message. Here the worker hands the exception back as an item
(:class:`WorkerFailure`) and the loader raises it in the main process as it was raised, type
and one-line message intact.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

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


class WorkerFailure:
    """An exception raised while a worker loaded an item, sent back to the main process as data."""

    def __init__(self, error: BaseException) -> None:
        try:  # the exception itself when it survives pickling (ours and the built-in ones do)
            pickle.loads(pickle.dumps(error))
            self.error: BaseException | None = error
        except Exception:  # noqa: BLE001 - any pickling failure: keep the type's name and the message
            self.error = None
        self.message = str(error) or type(error).__name__
        self.type_name = type(error).__name__

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error.with_traceback(None)
        raise RuntimeError(f"{self.type_name}: {self.message}")


class _Guarded(Dataset):
    """``dataset`` whose items, in a worker process, come back as :class:`WorkerFailure` instead of raising."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: Any) -> Any:
        if get_worker_info() is None:
            return self.dataset[i]
        try:
            return self.dataset[i]
        except Exception as e:  # noqa: BLE001 - every error is raised again in the main process
            return WorkerFailure(e)


def _collate(items: list[Any]) -> Any:
    """A worker's batch; an item that failed, or a batch that does not stack, as a :class:`WorkerFailure`."""
    failed = next((x for x in items if isinstance(x, WorkerFailure)), None)
    if failed is not None:
        return failed
    try:
        return default_collate(items)
    except Exception as e:  # noqa: BLE001 - raised again in the main process
        return WorkerFailure(e)


class Loader(DataLoader):
    """A DataLoader whose worker errors are raised in the main process as they were raised."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                batch.reraise()
            yield batch

    @property
    def source(self) -> Dataset:
        """The dataset as given to :func:`make_loader` (``dataset`` is its guarded wrapper)."""
        return self.dataset.dataset if isinstance(self.dataset, _Guarded) else self.dataset


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
    sampler's and ``shuffle`` is ignored (give the sampler its own seeded generator). An error
    raised in a worker process is raised again by the loader as it was (see the module doc).
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
    loader = Loader(
        _Guarded(dataset) if workers > 0 else dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate if workers > 0 else None,
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

    def __init__(self, loader: Loader, transform: BatchTransform, device: torch.device, seed: int) -> None:
        self.loader, self.transform, self.device, self.seed = loader, transform, device, seed
        self.dataset, self.batch_size = loader.source, loader.batch_size

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
