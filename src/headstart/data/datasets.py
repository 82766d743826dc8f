"""Datasets of labelled images, all behind one interface (:class:`ImageDataset`).

Every dataset holds raw images (arrays, file paths or one decoded tensor) and applies its
``transform`` in ``__getitem__``, so a caller can swap the transform (to cache features without
augmentation, say). What every dataset offers, and what callers may rely on:

* ``targets`` (list of class indices) and ``classes`` (list of names), ``len(ds)``;
* ``ds[i]``: ``(transform(image), target)``, or the untransformed image when ``transform`` is None;
* ``raw_image(i)``: image ``i`` as an RGB PIL image, untransformed (thumbnails, reports);
* ``describe(i)``: a stable name for image ``i`` (its file path, or ``digits #123``);
* ``subset(indices)``: a dataset of the same kind holding only those images, same transform;
* ``in_memory``: True when items cost no file read (loaders then default to no workers).

A new kind of dataset subclasses :class:`ImageDataset` and implements ``raw_image``,
``describe`` and ``_take``; it overrides ``image`` when its transform takes something other
than a PIL image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from headstart.data.images import load_image
from headstart.data.transforms import batched_transform


class ImageDataset(Dataset):
    """Shared behaviour: targets, classes, a settable transform, subsetting (see the module doc)."""

    #: True when images live in memory (no file reads): loaders then default to no workers.
    in_memory = False

    def __init__(self, targets: Sequence[int], classes: Sequence[str], transform: Callable | None) -> None:
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.image(i)
        transform = self.item_transform()
        return (transform(img) if transform is not None else img), self.targets[i]

    def image(self, i: int) -> Any:
        """What the transform takes for image ``i``: the RGB PIL image by default."""
        return self.raw_image(i)

    def item_transform(self) -> Callable | None:
        """The transform applied per item (None: items are returned untransformed)."""
        return self.transform

    def raw_image(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        """A new dataset of the same kind holding only ``indices`` (same transform)."""
        return self._take(np.asarray(indices, dtype=np.int64))

    def _take(self, idx: np.ndarray) -> "ImageDataset":  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


class ArrayDataset(ImageDataset):
    """Images held in a uint8 array: ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB.

    ``name`` and ``ids`` (each image's index in the original source) make ``describe`` stable
    across splits, e.g. ``digits #123``.
    """

    in_memory = True

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        classes: Sequence[str],
        *,
        name: str,
        ids: Sequence[int] | None = None,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(targets, classes, transform)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(self.targets):
            raise ValueError(
                f"images must be uint8 (N,H,W[,3]) matching targets, got {images.shape} {images.dtype}"
            )
        self.images = images
        self.name = name
        self.ids = np.arange(len(images)) if ids is None else np.asarray(ids, dtype=np.int64)

    def raw_image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image, untransformed."""
        return Image.fromarray(self.images[i]).convert("RGB")

    def describe(self, i: int) -> str:
        return f"{self.name} #{int(self.ids[i])}"

    def _take(self, idx: np.ndarray) -> "ArrayDataset":
        targets = np.asarray(self.targets)[idx]
        return ArrayDataset(
            self.images[idx], targets, self.classes,
            name=self.name, ids=self.ids[idx], transform=self.transform,
        )


class FileDataset(ImageDataset):
    """Images read from files on each access (:func:`load_image`)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Callable | None = None,
    ) -> None:
        super().__init__(targets, classes, transform)
        if len(paths) != len(self.targets):
            raise ValueError("paths and targets differ in length")
        # Strings pickle smaller and faster than Path objects when workers start.
        self.paths: list[str] = [str(p) for p in paths]

    def raw_image(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]

    def _take(self, idx: np.ndarray) -> "FileDataset":
        return FileDataset(
            [self.paths[i] for i in idx], [self.targets[i] for i in idx], self.classes, self.transform
        )


class MemoryDataset(ImageDataset):
    """Images held as one uint8 tensor ``(N, 3, H, W)``, decoded once from ``paths``.

    Items are ``(transform(image tensor), label)``: torchvision's v2 transforms take uint8
    tensors as they take PIL images. When ``batch_device`` is set and the transform has a
    batched equivalent, items are the raw uint8 tensors and :func:`headstart.data.make_loader`
    transforms whole batches on that device instead. Made by :func:`headstart.data.memory.hold_in_memory`.
    """

    # Decoded, but each item still costs a resize and crop: worker processes transform them
    # beside the training step, as for files (``loaders.default_workers``), unless batches are
    # transformed on the device, where items are plain slices.
    in_memory = False

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str], *,
                 paths: Sequence[str], transform: Any = None) -> None:
        super().__init__(targets, classes, transform)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) != len(targets):
            raise ValueError(f"images must be uint8 (N, 3, H, W) matching targets, got {tuple(images.shape)}")
        self.images = images
        self.paths: list[str] = [str(p) for p in paths]
        self.batch_device: torch.device | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def item_transform(self) -> Callable | None:
        # Batches transformed on the device: items stay raw uint8 slices.
        return None if batched_transform(self) is not None else self.transform

    def raw_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())

    def describe(self, i: int) -> str:
        return self.paths[i]

    def _take(self, idx: np.ndarray) -> "MemoryDataset":
        rows = idx.tolist()
        out = MemoryDataset(self.images[torch.as_tensor(idx)], [self.targets[i] for i in rows], self.classes,
                            paths=[self.paths[i] for i in rows], transform=self.transform)
        out.batch_device = self.batch_device
        return out

    def __repr__(self) -> str:
        return f"MemoryDataset({len(self)} images {self.stored_shape}, {len(self.classes)} classes)"
