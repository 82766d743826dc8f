"""The real images an export is checked on (validation split) and int8 is calibrated on (training split).

Both come from the run's own record: the checkpoint's config names the data source, split and
seed, so the validation images are the very ones the run was validated on, prepared by the
model's eval transform. ``--check-images DIR`` replaces them with any folder of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import HeadstartError

BATCH = 32


@dataclass
class Samples:
    """Prepared images as batches (the first of one image), with labels when known."""

    batches: list[np.ndarray]
    targets: np.ndarray | None  # model class indices, or None for unlabelled images
    inputs: str  # what they are, for config.json and the card

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def top1_basis(self) -> str:
        return "labels" if self.targets is not None else "agreement with the fp32 model"


def check_samples(ckpt: dict[str, Any], folder: str | Path | None, *, limit: int) -> Samples:
    """The images to verify on: every image under ``folder``, else the run's validation split."""
    if folder is not None:
        return folder_samples(ckpt, Path(folder).expanduser())
    bundle = _run_data(ckpt, "validation")
    return _as_samples(bundle.val, ckpt, limit, f"the run's validation split, {bundle.source}")


def training_samples(ckpt: dict[str, Any], *, limit: int) -> Samples:
    """Up to ``limit`` training images, eval transform (int8 calibration ranges)."""
    bundle = _run_data(ckpt, "training")
    bundle.train.transform = bundle.val.transform  # calibrate on what inference sees, not on augmentations
    return _as_samples(bundle.train, ckpt, limit, f"the run's training split, {bundle.source}")


def folder_samples(ckpt: dict[str, Any], folder: Path) -> Samples:
    """Images under ``folder``; labelled when its subfolders are all class names of the model."""
    from headstart.data import folder_dataset, list_images

    from .runtime import eval_transform

    classes = list(ckpt["classes"])
    subdirs = [d.name for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
    if subdirs and all(d in classes for d in subdirs):
        ds = folder_dataset(folder)
        _remap(ds, classes)
        ds.transform = eval_transform(ckpt)
        return _as_samples(ds, ckpt, None, f"--check-images {folder}")
    from headstart.data import load_image

    tf = eval_transform(ckpt)
    images = [tf(load_image(p)).numpy() for p in list_images(folder)]
    return Samples(_batched(np.stack(images).astype(np.float32)), None, f"--check-images {folder}")


def _run_data(ckpt: dict[str, Any], what: str) -> Any:
    """The run's data bundle, rebuilt from the checkpoint's config (no augmentation, not held in memory)."""
    from headstart.config import RunConfig, from_dict
    from headstart.data import build_data
    from headstart.models import Preprocessing

    if not ckpt.get("config"):
        raise HeadstartError(f"the checkpoint records no run config, so its {what} images are unknown: "
                             "give --check-images DIR with images the model should classify")
    cfg = from_dict(RunConfig, ckpt["config"])
    cfg.data.augment, cfg.data.in_memory, cfg.data.workers = False, False, 0
    try:
        bundle = build_data(cfg.data, Preprocessing.from_dict(ckpt["preprocessing"]), seed=cfg.train.seed)
    except HeadstartError as e:
        raise HeadstartError(f"cannot load the run's {what} images ({e}); give --check-images DIR instead") from None
    return bundle


def _remap(ds: Any, classes: list[str]) -> None:
    index = {c: i for i, c in enumerate(classes)}
    ds.targets = [index[ds.classes[t]] for t in ds.targets]
    ds.classes = list(classes)


def _as_samples(ds: Any, ckpt: dict[str, Any], limit: int | None, inputs: str) -> Samples:
    """Prepared images of ``ds``, at most ``limit`` of them spread evenly over it (it is sorted by class)."""
    if list(ds.classes) != list(ckpt["classes"]):
        _remap(ds, list(ckpt["classes"]))
    n = len(ds)
    if n == 0:
        raise HeadstartError(f"no images in {inputs}")
    idx = np.arange(n) if limit is None or n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    if len(idx) < n:
        inputs += f", {len(idx)} of {n} images evenly spread"
    items = [ds[int(i)] for i in idx]
    x = np.stack([t.numpy() for t, _ in items]).astype(np.float32)
    return Samples(_batched(x), np.array([int(y) for _, y in items]), inputs)


def _batched(x: np.ndarray) -> list[np.ndarray]:
    # One image first: an export whose batch axis is not truly dynamic fails verification.
    return [x[:1]] + [x[i : i + BATCH] for i in range(1, len(x), BATCH)]
