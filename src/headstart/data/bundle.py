"""What a data source gives: a train and a validation dataset with what describes them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headstart.data.datasets import ImageDataset


@dataclass
class DataBundle:
    """A train and a validation dataset with what describes them.

    ``source`` is ``digits``, ``cifar10``, ``cifar100`` or the folder path; ``skipped`` counts the
    images left out while scanning a folder (unreadable, or the same file reached twice); ``kind``
    is the transform family used (``photo`` or ``digits``), for callers that build more
    transforms with :func:`headstart.data.build_transform`.
    """

    train: ImageDataset
    val: ImageDataset
    classes: list[str]
    source: str
    skipped: int = 0
    kind: str = "photo"

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: ``{"train": {cls: n}, "val": {cls: n}}`` (zeros kept)."""
        out: dict[str, dict[str, int]] = {}
        for split, ds in (("train", self.train), ("val", self.val)):
            counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(self.classes))
            out[split] = {c: int(n) for c, n in zip(self.classes, counts)}
        return out
