"""Images decoded once and held in memory, and transforms run a batch at a time on the device.

Reading an image folder costs a JPEG decode and a resize per image per epoch; for a few thousand
images that is wasted work repeated every epoch. :func:`hold_in_memory` decodes each file once
into one uint8 tensor ``(N, 3, H, W)`` (about 64 KB per image at 146 px), when that fits in
``data.memory_gb`` or when asked to, and :class:`MemoryDataset` then serves the same transforms
from it. Small images that all share one size (CIFAR-like) are kept exactly as decoded; others
are resized so their shorter side is the preprocessing's ``resize`` and centre-cropped square,
which is exactly the first step of evaluation's resize-and-centre-crop (random crops for
training are then drawn from that square rather than from the full-size photo).

On a GPU the per-image transform in the loader becomes the bottleneck; :class:`BatchTransform`
does the same resize/crop, random resized crop, horizontal flip and normalisation for a whole
uint8 batch on the device (``data.batch_transforms``; on CUDA by default), and
:class:`DeviceBatches` wraps a loader so that every batch arrives transformed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from headstart.errors import HeadstartError
from headstart.models.preprocess import Preprocessing

log = logging.getLogger("headstart.data")

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


# --------------------------------------------------------------------------- in-memory images


class MemoryDataset(Dataset):
    """Images held as one uint8 tensor ``(N, 3, H, W)``, decoded once from ``paths``.

    Items are ``(transform(image tensor), label)``: torchvision's v2 transforms take uint8
    tensors as they take PIL images. When ``batch_device`` is set and the transform has a
    batched equivalent, items are the raw uint8 tensors and :func:`headstart.data.make_loader`
    transforms whole batches on that device instead.
    """

    # Decoded, but each item still costs a resize and crop: worker processes transform them
    # beside the training step, as for files (``data.default_workers``), unless batches are
    # transformed on the device, where items are plain slices.
    in_memory = False

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str], *,
                 paths: Sequence[str], transform: Any = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) != len(targets):
            raise ValueError(f"images must be uint8 (N, 3, H, W) matching targets, got {tuple(images.shape)}")
        self.images = images
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.paths: list[str] = [str(p) for p in paths]
        self.transform = transform
        self.batch_device: torch.device | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.images[i]
        if self.transform is None or batched_transform(self) is not None:
            return img, self.targets[i]
        return self.transform(img), self.targets[i]

    def raw_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())

    def describe(self, i: int) -> str:
        return self.paths[i]

    def subset(self, indices: Sequence[int]) -> "MemoryDataset":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        out = MemoryDataset(self.images[idx], [self.targets[i] for i in idx.tolist()], self.classes,
                            paths=[self.paths[i] for i in idx.tolist()], transform=self.transform)
        out.batch_device = self.batch_device
        return out

    def __repr__(self) -> str:
        return f"MemoryDataset({len(self)} images {self.stored_shape}, {len(self.classes)} classes)"


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
        from torchvision.transforms import v2

        from headstart.data.core import _INTERPOLATIONS, load_image

        img = v2.functional.pil_to_tensor(load_image(self.paths[i]))
        if self.shape is None:
            interp = _INTERPOLATIONS[self.pre.interpolation]
            img = v2.functional.resize(img, self.pre.resize, interpolation=interp, antialias=True)
            img = v2.functional.center_crop(img, [self.pre.resize, self.pre.resize])
        elif tuple(img.shape[1:]) != self.shape:  # a file changed since it was measured
            raise HeadstartError(f"{self.paths[i]} is {tuple(img.shape[1:])}, expected {self.shape}")
        return img


def decode_files(paths: Sequence[str], shape: tuple[int, int] | None, pre: Preprocessing, *,
                 workers: int, progress: bool, desc: str) -> torch.Tensor:
    """Decode ``paths`` into one uint8 tensor, ``workers`` processes in parallel."""
    from headstart.progress import Progress

    h, w = shape or (pre.resize, pre.resize)
    out = torch.empty((len(paths), 3, h, w), dtype=torch.uint8)
    loader = DataLoader(_Decode(paths, shape, pre), batch_size=64, num_workers=workers, shuffle=False)
    bar = Progress(loader, len(loader), desc, enabled=progress)
    at = 0
    for batch in bar:
        out[at : at + len(batch)] = batch
        at += len(batch)
        bar.update(len(batch))
    return out


def image_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each file, read from the headers (EXIF rotation applied)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees on load
                w, h = h, w
            out.append((w, h))
    return out


def hold_in_memory(bundle: Any, *, enabled: bool | None, memory_gb: float, pre: Preprocessing,
                   workers: int, progress: bool = False, say: Any = log.info) -> Any:
    """Replace the bundle's file-backed splits by :class:`MemoryDataset` when asked or when they fit.

    ``enabled=None`` decides by size (all splits together under ``memory_gb``), True insists
    (an error names the size when it does not fit), False keeps reading files.
    """
    from headstart.data.core import FileDataset

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


# --------------------------------------------------------------------------- batched transforms


@dataclass
class BatchTransform:
    """Resize/crop (evaluation) or random resized crop + flip (training), then normalise, per batch.

    The batched twin of :func:`headstart.data.build_transform` for photos without an automatic
    policy: the same crop scales (0.35-1) and aspect ratios (3/4-4/3), drawn per image from a
    generator on the batch's device. Interpolation runs in float32 on the uint8 values.
    """

    pre: Preprocessing
    train: bool

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = x.float()
        if self.train:
            x = self._random_resized_crop(x, gen)
            flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        else:
            x = self._resize_center_crop(x)
        mean = torch.tensor(self.pre.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.pre.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x - mean) / std

    def _resize_center_crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) != self.pre.resize:
            scale = self.pre.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=size, mode=_MODES[self.pre.interpolation],
                              antialias=self.pre.interpolation != "nearest" and scale < 1,
                              align_corners=False if self.pre.interpolation != "nearest" else None)
            h, w = size
        c = self.pre.crop
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        return x[..., top : top + c, left : left + c].clamp(0, 255)

    def _random_resized_crop(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, _, h, w = x.shape
        dev = x.device
        area = h * w * torch.empty(n, device=dev).uniform_(0.35, 1.0, generator=gen)
        ratio = torch.exp(torch.empty(n, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = torch.rand(n, generator=gen, device=dev) * (w - cw)
        y0 = torch.rand(n, generator=gen, device=dev) * (h - ch)
        boxes = torch.stack([torch.arange(n, device=dev, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], 1)
        # roi_align samples each output cell bilinearly (averaging 2x2 points when shrinking).
        return roi_align(x, boxes, (self.pre.crop, self.pre.crop), 1.0, 2, True).clamp(0, 255)


def batched_transform(ds: Any) -> BatchTransform | None:
    """The batched twin of ``ds.transform`` when ``ds`` is set to transform on a device, else None."""
    if getattr(ds, "batch_device", None) is None:
        return None
    spec = getattr(ds.transform, "spec", None)
    if spec is None or spec["kind"] != "photo" or spec["policy"] != "none":
        return None
    return BatchTransform(spec["pre"], train=spec["train"] and spec["augment"])


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


def enable_batch_transforms(bundle: Any, device: torch.device) -> bool:
    """Transform the bundle's in-memory photo splits a batch at a time on ``device``."""
    done = False
    for name in ("train", "val"):
        ds = getattr(bundle, name)
        if isinstance(ds, MemoryDataset):
            ds.batch_device = device
            done = True
    return done
