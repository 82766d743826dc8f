"""Seeded, stratified splits and subsets of a dataset's targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from headstart.data.datasets import ImageDataset
from headstart.errors import HeadstartError


def stratified_split(targets: Sequence[int], val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train, val) indices, each sorted.

    Every class with at least two images gets at least one in each split; a class with one
    image keeps it in train. (sklearn's ``train_test_split`` refuses classes of one image and
    test sets smaller than the number of classes, both common in small folders.)
    """
    rng = np.random.default_rng(seed)
    t = np.asarray(targets)
    train, val = [], []
    for c in np.unique(t):
        idx = rng.permutation(np.flatnonzero(t == c))
        n_val = 0 if len(idx) < 2 else min(max(1, round(len(idx) * val_split)), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_limit(targets: Sequence[int], limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of at most ``limit`` items keeping class proportions.

    Each class is shuffled and its k-th item gets the key ``k / class_size``; taking the lowest
    keys interleaves the classes proportionally (round-robin when classes are equal) and puts
    every class in as soon as ``limit`` reaches the number of classes.
    """
    t = np.asarray(targets)
    if limit >= len(t):
        return np.arange(len(t))
    rng = np.random.default_rng(seed)
    order, keys = [], []
    for c in np.unique(t):
        idx = rng.permutation(np.flatnonzero(t == c))
        order.append(idx)
        keys.append(np.arange(len(idx)) / len(idx))
    order_all, keys_all = np.concatenate(order), np.concatenate(keys)
    tie = rng.random(len(keys_all))  # random tie-break so no class is always first
    chosen = order_all[np.lexsort((tie, keys_all))[:limit]]
    return np.sort(chosen)


def apply_limit(ds: ImageDataset, limit: int | None, seed: int, what: str) -> ImageDataset:
    """``ds`` cut to a stratified ``limit`` images (``what`` names the setting in errors)."""
    if limit is None:
        return ds
    if limit < 1:
        raise HeadstartError(f"data.{what} must be a positive number of images or none, got {limit}")
    if limit >= len(ds):
        return ds
    return ds.subset(stratified_limit(ds.targets, limit, seed))


def check_val_split(val_split: float, where: str) -> None:
    """Refuse a ``data.val_split`` that would leave no train or no validation images."""
    if not 0.0 < val_split < 1.0:
        raise HeadstartError(
            f"data.val_split must be between 0 and 1 (exclusive) to hold out validation images "
            f"from {where}, got {val_split}; e.g. data.val_split=0.2"
        )
