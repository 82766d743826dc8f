"""The order and the augmentation draws of a training epoch, seeded so that a run repeats exactly.

Each epoch's order comes from its own generator, seeded from the run's seed and the epoch's
index (:func:`epoch_seed`), so epoch k's batches are the same whether a run started at epoch 0
or resumed at epoch k, or inside it (:class:`SkipSampler` leaves out the batches already
trained without loading them). Every draw of an epoch seeds its own transform from the epoch's
seed and its position in the epoch's order (:func:`item_seed`), so augmentation depends neither
on which loader worker runs it nor on what was skipped.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler, get_worker_info

from headstart.config import RunConfig
from headstart.data import make_loader
from headstart.runtime.distributed import ShardSampler, per_rank_batch
from headstart.runtime.distributed import world as current_world

_MASK64 = 2**64 - 1


def epoch_seed(seed: int, global_epoch: int) -> int:
    """The seed of the run's ``global_epoch``-th epoch (counted over all stages, from 0)."""
    return seed * 100_003 + global_epoch


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit number from any integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def item_seed(epoch_seed: int, position: int) -> int:
    """The seed of the ``position``-th draw of the epoch seeded ``epoch_seed``."""
    return _mix64(_mix64(epoch_seed & _MASK64) + position)


class _Draw(int):
    """A dataset index that also carries its position in the epoch's order of draws."""

    pos: int

    def __new__(cls, index: int, pos: int) -> "_Draw":
        self = super().__new__(cls, index)
        self.pos = pos
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # sent to loader workers
        return (_Draw, (int(self), self.pos))


class _DrawPositions(Sampler[int]):
    """``base``'s indices, each tagged with its position in the epoch (:class:`_Draw`)."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base

    def __iter__(self) -> Any:
        return (_Draw(i, pos) for pos, i in enumerate(self.base))

    def __len__(self) -> int:
        return len(self.base)


class SkipSampler(Sampler[int]):
    """``base`` without its first ``skip`` indices: batches already trained are never loaded.

    Example::

        >>> list(SkipSampler(range(6), 4))
        [4, 5]
    """

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class _SeededItems(Dataset):
    """A training dataset whose random transform is seeded per draw.

    Draw ``pos`` of an epoch seeds torch's CPU generator, ``random`` and numpy from
    ``item_seed(epoch_seed, pos)`` before its item is loaded, so its augmentation does not depend
    on which loader worker loads it, on how many workers there are, or on batches skipped when a
    run resumes mid-epoch. Seeding by position rather than by image keeps a repeated draw (the
    balanced sampler draws with replacement) from repeating its augmentation too; the padding
    torchrun adds to even out the ranks' shares does repeat it. In the main process (no workers)
    torch's CPU generator is put back afterwards, so the training loop's own draws (dropout,
    MixUp) are the same with and without workers; ``random`` and numpy are left as the last item
    seeded them (nothing in the loop draws from them, and saving and restoring numpy's state
    would add about 80 us an item, measured against 13 us for all of this seeding).
    """

    def __init__(self, dataset: Any, epoch_seed: int) -> None:
        self.dataset, self.epoch_seed = dataset, epoch_seed

    @property
    def targets(self) -> Any:
        return self.dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        seed = item_seed(self.epoch_seed, getattr(i, "pos", int(i)))
        if get_worker_info() is not None:  # a worker's generators serve only its items
            _seed_item(seed)
            return self.dataset[int(i)]
        saved = torch.random.default_generator.get_state()
        try:
            _seed_item(seed)
            return self.dataset[int(i)]
        finally:
            torch.random.default_generator.set_state(saved)


def _seed_item(seed: int) -> None:
    # The CPU generator only (torch.manual_seed would reseed every CUDA device too): transforms
    # run on the CPU, and the training loop's CUDA draws must not move.
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def epoch_loader(dataset: Any, cfg: RunConfig, epoch_seed: int, workers: int | None,
                 skip_batches: int = 0) -> DataLoader:
    """The loader of one training epoch; ``skip_batches`` leaves out its first batches.

    The order of each epoch comes from its own generator, so epoch k's batches are the same
    whether the run started at epoch 0 or resumed at epoch k (or inside it). Balanced sampling
    (``data.balanced``) draws with replacement, each image with probability inverse to its
    class's size. Under torchrun every rank draws the same order and takes its share of it.
    """
    gen = torch.Generator().manual_seed(epoch_seed)
    if cfg.data.balanced:
        # Each image is drawn with probability inverse to its class's size: classes are seen
        # equally often, and an epoch still has as many draws as there are images.
        counts = np.bincount(np.asarray(dataset.targets))
        weights = torch.as_tensor(1.0 / counts[np.asarray(dataset.targets)], dtype=torch.double)
        sampler: Any = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=gen)
    else:
        sampler = RandomSampler(dataset, generator=gen)
    if cfg.data.augment and getattr(dataset, "transform", None) is not None:
        # Images with a random transform (stored features have none): seeded per draw.
        dataset, sampler = _SeededItems(dataset, epoch_seed), _DrawPositions(sampler)
    w = current_world()
    if w.enabled:  # every rank draws the same permutation and takes its share of it
        sampler = ShardSampler(sampler, w)
    batch = per_rank_batch(cfg.data.batch_size)
    if skip_batches:  # after the rank's share: batches of this rank are skipped
        sampler = SkipSampler(sampler, skip_batches * batch)
    return make_loader(dataset, batch_size=batch, shuffle=False, workers=workers,
                       seed=epoch_seed, sampler=sampler, drop_last=len(dataset) > cfg.data.batch_size)


def steps_per_epoch(dataset: Any, cfg: RunConfig) -> int:
    """Optimizer steps in one epoch over ``dataset`` (what a per-step schedule spans)."""
    return len(epoch_loader(dataset, cfg, 0, 0))
