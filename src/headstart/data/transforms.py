"""Transforms: an RGB image to a normalised tensor, one image at a time or a batch at a time.

:func:`build_transform` gives torchvision's per-image pipeline (resize and centre crop for
evaluation, a random resized crop and flips for training, or the digits' recipe).
:class:`BatchTransform` is its twin for a whole uint8 batch on the device, used for in-memory
photos when ``data.batch_transforms`` is on; :func:`batched_transform` says when a dataset's
transform has such a twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from headstart.errors import HeadstartError
from headstart.models.preprocess import Preprocessing

#: Interpolation names of :class:`Preprocessing` and torchvision's modes for them.
INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
#: Automatic augmentation policies for photos (``data.auto_augment``).
AUTO_AUGMENT = ("none", "randaugment", "trivialaugment")


def interpolation(pre: Preprocessing) -> v2.InterpolationMode:
    """torchvision's mode for ``pre.interpolation``; a :class:`HeadstartError` names unknown ones."""
    if pre.interpolation not in INTERPOLATIONS:
        raise HeadstartError(
            f"unknown interpolation {pre.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
        )
    return INTERPOLATIONS[pre.interpolation]


def warp_mode(interp: v2.InterpolationMode) -> v2.InterpolationMode:
    """The mode for affine warps (rotations, shears, translations) of image tensors: torchvision's
    grid sampling there takes nearest or bilinear only, so a bicubic model (timm's EfficientNets)
    warps bilinearly; its resizes stay bicubic."""
    return v2.InterpolationMode.BILINEAR if interp == v2.InterpolationMode.BICUBIC else interp


def build_transform(
    pre: Preprocessing, *, train: bool, augment: bool, kind: str = "photo", policy: str = "none"
) -> Callable[[Image.Image], torch.Tensor]:
    """The transform turning an RGB PIL image into a normalised float tensor ``(3, crop, crop)``.

    ``kind="photo"``: evaluation resizes the shorter side to ``pre.resize`` and centre-crops
    ``pre.crop``; augmented training uses a random resized crop and horizontal flips.
    ``kind="digits"``: images are resized straight to ``crop × crop``; augmented training adds a
    small random affine (never flips: digits are not mirror-symmetric).
    """
    interp = interpolation(pre)
    augmenting = train and augment
    steps: list[Any] = [v2.ToImage()]
    if kind == "photo":
        if augmenting:
            steps += [
                v2.RandomResizedCrop(pre.crop, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
            steps += _policy(policy, warp_mode(interp))
        else:
            steps += [v2.Resize(pre.resize, interpolation=interp, antialias=True), v2.CenterCrop(pre.crop)]
    elif kind == "digits":
        # Digits are square and the stroke reaches the 8×8 border: the photo recipe's
        # resize-then-centre-crop margin would cut strokes away, so eval and train both resize
        # straight to the input size. Augmentation runs after the upscale so the affine
        # interpolates a smooth image, not 8×8 blocks.
        steps.append(v2.Resize((pre.crop, pre.crop), interpolation=interp, antialias=True))
        if augmenting:
            steps.append(
                v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=warp_mode(interp))
            )
    else:
        raise ValueError(f"unknown transform kind {kind!r}; use 'photo' or 'digits'")
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
        v2.ToPureTensor(),  # plain tensors: callers need not know about tv_tensors
    ]
    return ImageTransform(steps, spec={"pre": pre, "train": train, "augment": augment, "kind": kind,
                                       "policy": policy})


class ImageTransform(v2.Compose):
    """A :func:`build_transform` pipeline that remembers how it was built (``spec``), so that
    in-memory images can be given its batched twin (:class:`BatchTransform`)."""

    def __init__(self, transforms: Sequence[Callable], spec: dict[str, Any]) -> None:
        super().__init__(transforms)
        self.spec = spec


def _policy(policy: str, interp: Any) -> list[Any]:
    """torchvision's automatic augmentation policies, for photos (uint8 images, before scaling)."""
    if policy == "randaugment":
        return [v2.RandAugment(interpolation=interp)]
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interp)]
    if policy != "none":
        raise HeadstartError(f"unknown augmentation policy {policy!r}; use {', '.join(AUTO_AUGMENT)}")
    return []


# --------------------------------------------------------------------------- a batch at a time

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


@dataclass
class BatchTransform:
    """Resize/crop (evaluation) or random resized crop + flip (training), then normalise, per batch.

    The batched twin of :func:`build_transform` for photos without an automatic policy: the same
    crop scales (0.35-1) and aspect ratios (3/4-4/3), drawn per image from a generator on the
    batch's device. Interpolation runs in float32 on the uint8 values.
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
