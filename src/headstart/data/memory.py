"""Images decoded once and held in memory.

Reading an image folder costs a JPEG decode and a resize per image per epoch; for a few thousand
images that is wasted work repeated every epoch. :func:`hold_in_memory` decodes each file once
into one uint8 tensor ``(N, 3, H, W)`` (about 64 KB per image at 146 px), when that fits in
``data.memory_gb`` or when asked to, and :class:`~headstart.data.datasets.MemoryDataset` then
serves the same transforms from it. Small images that all share one size (CIFAR-like) are kept
exactly as decoded; others are resized so their shorter side is the preprocessing's ``resize``
and centre-cropped square, which is exactly the first step of evaluation's resize-and-centre-crop
(random crops for training are then drawn from that square rather than from the full-size photo).

On a GPU the per-image transform in the loader becomes the bottleneck:
:func:`enable_batch_transforms` has the loader transform whole uint8 batches on the device
(:class:`~headstart.data.transforms.BatchTransform`) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from headstart.data.bundle import DataBundle
from headstart.data.datasets import FileDataset, MemoryDataset
from headstart.data.images import image_size, load_image
from headstart.data.loaders import make_loader
from headstart.data.transforms import interpolation
from headstart.errors import HeadstartError
from headstart.models.preprocess import Preprocessing
from headstart.progress import Progress

log = logging.getLogger("headstart.data")


def stored_size(sizes: Sequence[tuple[int, int]], pre: Preprocessing) -> tuple[int, int] | None:
    """(H, W) to keep every image at, or None for "resize to ``pre.resize`` and crop square".

    Images that all share one size no larger than the resize target are kept as they are: the
    transforms then see exactly what they would have read from the files.
    """
    if sizes and len(set(sizes)) == 1:
        w, h = sizes[0]
        if min(w, h) <= pre.resize:
            return h, w
    return None


def estimate_bytes(n_images: int, shape: tuple[int, int] | None, pre: Preprocessing) -> int:
    h, w = shape or (pre.resize, pre.resize)
    return n_images * 3 * h * w


class _Decode(Dataset):
    """One file decoded to a uint8 ``(3, H, W)`` tensor at the stored size (for a parallel loader)."""

    def __init__(self, paths: Sequence[str], shape: tuple[int, int] | None, pre: Preprocessing) -> None:
        self.paths, self.shape, self.pre = list(paths), shape, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = v2.functional.pil_to_tensor(load_image(self.paths[i]))
        if self.shape is None:
            img = v2.functional.resize(img, self.pre.resize, interpolation=interpolation(self.pre), antialias=True)
            img = v2.functional.center_crop(img, [self.pre.resize, self.pre.resize])
        elif tuple(img.shape[1:]) != self.shape:  # a file changed since it was measured
            raise HeadstartError(f"{self.paths[i]} is {tuple(img.shape[1:])}, expected {self.shape}")
        return img


def decode_files(paths: Sequence[str], shape: tuple[int, int] | None, pre: Preprocessing, *,
                 workers: int, progress: bool, desc: str) -> torch.Tensor:
    """Decode ``paths`` into one uint8 tensor, ``workers`` processes in parallel."""
    h, w = shape or (pre.resize, pre.resize)
    out = torch.empty((len(paths), 3, h, w), dtype=torch.uint8)
    loader = make_loader(_Decode(paths, shape, pre), batch_size=64, shuffle=False, workers=workers, seed=0)
    bar = Progress(loader, len(loader), desc, enabled=progress)
    at = 0
    for batch in bar:
        out[at : at + len(batch)] = batch
        at += len(batch)
        bar.update(len(batch))
    return out


def image_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each file, read from the headers (EXIF rotation applied)."""
    return [image_size(p) for p in paths]


def hold_in_memory(bundle: DataBundle, *, enabled: bool | None, memory_gb: float, pre: Preprocessing,
                   workers: int, progress: bool = False, say: Callable[[str], Any] = log.info) -> DataBundle:
    """Replace the bundle's file-backed splits by :class:`MemoryDataset` when asked or when they fit.

    ``enabled=None`` decides by size (all splits together under ``memory_gb``), True insists
    (an error names the size when it does not fit), False keeps reading files.
    """
    splits = {n: getattr(bundle, n) for n in ("train", "val") if isinstance(getattr(bundle, n), FileDataset)}
    if enabled is False or not splits:
        return bundle
    sizes = {n: image_sizes(ds.paths) for n, ds in splits.items()}
    shapes = {n: stored_size(s, pre) for n, s in sizes.items()}
    need = sum(estimate_bytes(len(splits[n]), shapes[n], pre) for n in splits)
    if need > memory_gb * 2**30:
        if enabled:
            raise HeadstartError(
                f"data.in_memory: the decoded images need {need / 2**30:.2f} GB, more than data.memory_gb "
                f"({memory_gb:g}); raise data.memory_gb or set data.in_memory to false")
        say(f"images read from files each epoch: decoded they would take {need / 2**30:.2f} GB "
            f"(data.memory_gb is {memory_gb:g})")
        return bundle
    for n, ds in splits.items():
        images = decode_files(ds.paths, shapes[n], pre, workers=workers, progress=progress,
                              desc=f"decoding {n} images")
        setattr(bundle, n, MemoryDataset(images, ds.targets, ds.classes, paths=ds.paths, transform=ds.transform))
    say(f"{sum(len(d) for d in splits.values()):,} images decoded once and held in memory "
        f"({need / 2**20:.0f} MB as uint8)")
    return bundle


def enable_batch_transforms(bundle: DataBundle, device: torch.device) -> bool:
    """Transform the bundle's in-memory photo splits a batch at a time on ``device``."""
    done = False
    for name in ("train", "val"):
        ds = getattr(bundle, name)
        if isinstance(ds, MemoryDataset):
            ds.batch_device = device
            done = True
    return done
