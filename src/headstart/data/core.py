"""Datasets, transforms and loaders.

:func:`build_data` turns a :class:`~headstart.config.DataConfig` into a :class:`DataBundle` (a
train and a validation dataset plus the class names). Three kinds of source are understood:

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (no download, handy for smoke runs);
* ``cifar10`` / ``cifar100``: downloaded once by torchvision into ``data.root``;
* a folder path in ImageFolder layout: ``folder/<class>/<image>``, or ``folder/train/<class>/...``
  beside ``folder/val/<class>/...`` (``valid/``, ``validation/`` and ``test/`` are accepted too).

Every dataset returned holds raw images (arrays or file paths) and applies its ``transform`` in
``__getitem__``; it also exposes ``targets``, ``classes``, ``describe(i)`` and ``raw_image(i)``,
so callers can count classes, build samplers, show thumbnails or swap transforms.

Example::

    >>> from headstart.config import DataConfig
    >>> from headstart.models.preprocess import Preprocessing
    >>> bundle = build_data(DataConfig(source="digits"), Preprocessing(crop=32, resize=36))
    >>> len(bundle.classes), len(bundle.train) + len(bundle.val)
    (10, 1797)
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from headstart.config import DataConfig
from headstart.errors import HeadstartError, OfflineError
from headstart.models.preprocess import Preprocessing

log = logging.getLogger("headstart.data")

#: Dataset names understood besides folder paths.
KNOWN_SOURCES = ("digits", "cifar10", "cifar100")
#: File extensions (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: Names accepted for the validation split folder beside ``train/``, in order of preference.
VAL_DIR_NAMES = ("val", "valid", "validation", "test")

_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
# How many unreadable paths a warning / error message lists before "and N more".
_LIST_IN_WARNING = 5
_LIST_IN_ERROR = 20


# --------------------------------------------------------------------------- the bundle


@dataclass
class DataBundle:
    """A train and a validation dataset with what describes them.

    ``source`` is ``digits``, ``cifar10``, ``cifar100`` or the folder path; ``skipped`` counts the
    unreadable images left out while scanning a folder; ``kind`` is the transform family used
    (``photo`` or ``digits``), for callers that build more transforms with :func:`build_transform`.
    """

    train: Dataset
    val: Dataset
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


# --------------------------------------------------------------------------- datasets


class _ImageDataset(Dataset):
    """Shared behaviour: targets, classes, a settable transform, subsetting.

    Subclasses implement ``raw_image(i)``, ``describe(i)`` and ``_take(indices)``.
    """

    #: True when images live in memory (no file reads): loaders then default to no workers.
    in_memory = False

    def __init__(self, targets: Sequence[int], classes: Sequence[str], transform: Callable | None) -> None:
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.raw_image(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def raw_image(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "_ImageDataset":
        """A new dataset of the same kind holding only ``indices`` (same transform)."""
        return self._take(np.asarray(indices, dtype=np.int64))

    def _take(self, idx: np.ndarray) -> "_ImageDataset":  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


class ArrayDataset(_ImageDataset):
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


class FileDataset(_ImageDataset):
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


# --------------------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """Read any image file as an 8-bit RGB PIL image, EXIF orientation applied.

    Grayscale, palette, 1-bit, CMYK and 16/32-bit images are converted rather than rejected;
    transparent pixels are composited on white. Raises :class:`HeadstartError` when the file is
    missing or cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise HeadstartError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise HeadstartError(
            f"cannot read image {path}: {e}. Re-export it as JPEG or PNG, or remove it."
        ) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see :func:`load_image`)."""
    if im.mode.startswith("I") or im.mode == "F":
        # PIL's convert("RGB") clips wide integers to 255, turning 16-bit images white:
        # scale by the bit depth instead.
        return Image.fromarray(_wide_to_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        # Transparent pixels usually hold black or junk colour; white is what viewers show.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, P, 1, CMYK, YCbCr, LAB, HSV and RGB: PIL's own conversion is right for these.
    return im.convert("RGB")


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grayscale array to 0–255."""
    if mode == "F":
        a = a.astype(np.float64)
        # Floats are usually 0–1 (scientific exports); otherwise assume they are already 0–255.
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        # Mode "I" is a 32-bit container, often holding 16-bit (or 8-bit) data: take the
        # smallest bit depth that holds the largest value.
        peak = int(a.max()) if a.size else 0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(2**32 - 1)
    return np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)


def _is_image_file(p: Path) -> bool:
    # Dot files include macOS "._name.jpg" resource forks, which are not images.
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _find_images(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if _is_image_file(p))
    return sorted(found)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; a single image file gives ``[file]``.

    Raises :class:`HeadstartError` when the path does not exist or holds no images.
    """
    p = Path(os.path.expanduser(str(folder)))
    if not p.exists():
        raise HeadstartError(f"{p} does not exist; give a folder of images or an image file")
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return [p]
        raise HeadstartError(
            f"{p} is not an image file (known extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    images = _find_images(p)
    if not images:
        raise HeadstartError(
            f"no images found under {p} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
        )
    return images


def _image_problem(path: Path) -> str | None:
    """None when ``path`` opens as an image, else why not.

    ``verify()`` reads headers and chunk checksums without decoding pixels, so scanning stays
    cheap; a file truncated mid-data can still pass and fail later in :func:`load_image`.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _check_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` for every unreadable file in ``paths``."""
    if not paths:
        return []
    # File opens are I/O-bound (and slow on network drives): threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        problems = list(pool.map(_image_problem, paths))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]


def _listing(items: Sequence[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------- transforms


AUTO_AUGMENT = ("none", "randaugment", "trivialaugment")


def build_transform(
    pre: Preprocessing, *, train: bool, augment: bool, kind: str = "photo", policy: str = "none"
) -> Callable[[Image.Image], torch.Tensor]:
    """The transform turning an RGB PIL image into a normalised float tensor ``(3, crop, crop)``.

    ``kind="photo"``: evaluation resizes the shorter side to ``pre.resize`` and centre-crops
    ``pre.crop``; augmented training uses a random resized crop and horizontal flips.
    ``kind="digits"``: images are resized straight to ``crop × crop``; augmented training adds a
    small random affine (never flips: digits are not mirror-symmetric).
    """
    if pre.interpolation not in _INTERPOLATIONS:
        raise HeadstartError(
            f"unknown interpolation {pre.interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
        )
    interp = _INTERPOLATIONS[pre.interpolation]
    augmenting = train and augment
    steps: list[Any] = [v2.ToImage()]
    if kind == "photo":
        if augmenting:
            steps += [
                v2.RandomResizedCrop(pre.crop, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
            steps += _policy(policy, interp)
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
                v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=interp)
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
    in-memory images can be given its batched twin (:class:`headstart.data.memory.BatchTransform`)."""

    def __init__(self, transforms: Sequence[Callable], spec: dict[str, Any]) -> None:
        super().__init__(transforms)
        self.spec = spec


# --------------------------------------------------------------------------- splitting


def _policy(policy: str, interp: Any) -> list[Any]:
    """torchvision's automatic augmentation policies, for photos (uint8 images, before scaling)."""
    if policy == "randaugment":
        return [v2.RandAugment(interpolation=interp)]
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interp)]
    if policy != "none":
        raise HeadstartError(f"unknown augmentation policy {policy!r}; use {', '.join(AUTO_AUGMENT)}")
    return []


def _stratified_split(targets: Sequence[int], val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


def _stratified_limit(targets: Sequence[int], limit: int, seed: int) -> np.ndarray:
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


def _apply_limit(ds: _ImageDataset, limit: int | None, seed: int, what: str) -> _ImageDataset:
    if limit is None:
        return ds
    if limit < 1:
        raise HeadstartError(f"data.{what} must be a positive number of images or none, got {limit}")
    if limit >= len(ds):
        return ds
    return ds.subset(_stratified_limit(ds.targets, limit, seed))


def _check_val_split(val_split: float, where: str) -> None:
    if not 0.0 < val_split < 1.0:
        raise HeadstartError(
            f"data.val_split must be between 0 and 1 (exclusive) to hold out validation images "
            f"from {where}, got {val_split}; e.g. data.val_split=0.2"
        )


# --------------------------------------------------------------------------- sources


def build_data(cfg: DataConfig, pre: Preprocessing, *, seed: int = 0, progress: bool = False) -> DataBundle:
    """Build the train and validation datasets that ``cfg`` describes.

    ``pre`` gives the input size and normalisation; ``seed`` fixes the validation split and the
    ``limit_train``/``limit_val`` subsets. Image folders are decoded once into memory when they
    fit (``data.in_memory``, :mod:`headstart.data.memory`); ``progress`` shows and reports that.
    Raises :class:`HeadstartError` for unknown sources,
    bad folders or settings, and :class:`OfflineError` when a download is needed but fails.
    """
    source = str(cfg.source).strip()
    name = source.lower()
    if name == "digits":
        bundle = _digits(cfg, seed)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar(cfg, name)
    else:
        bundle = _folder(cfg, source, seed)
    # Evaluation data is never augmented; only the train split gets the random transform.
    bundle.train.transform = build_transform(pre, train=True, augment=cfg.augment, kind=bundle.kind,
                                             policy=cfg.auto_augment)
    bundle.val.transform = build_transform(pre, train=False, augment=False, kind=bundle.kind)
    bundle.train = _apply_limit(bundle.train, cfg.limit_train, seed, "limit_train")
    bundle.val = _apply_limit(bundle.val, cfg.limit_val, seed, "limit_val")
    if len(bundle.val) == 0:
        raise HeadstartError(
            f"{source} leaves no images for validation (each class needs at least 2 images for a split); "
            "add images, raise data.val_split, or give train/ and val/ folders"
        )
    from headstart.data.memory import hold_in_memory

    return hold_in_memory(bundle, enabled=cfg.in_memory, memory_gb=cfg.memory_gb, pre=pre,
                          workers=default_workers(bundle.train) if cfg.workers is None else cfg.workers,
                          progress=progress, say=print if progress else log.info)


def _digits(cfg: DataConfig, seed: int) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits as 8-bit grayscale, split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_val_split(cfg.val_split, "digits")
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0–16
    classes = [str(i) for i in range(10)]
    ids = np.arange(len(images))
    tr, va = train_test_split(ids, test_size=cfg.val_split, random_state=seed, stratify=d.target)
    tr, va = np.sort(tr), np.sort(va)
    full = ArrayDataset(images, d.target, classes, name="digits")
    return DataBundle(full.subset(tr), full.subset(va), classes, "digits", 0, kind="digits")


def _cifar(cfg: DataConfig, name: str) -> DataBundle:
    """CIFAR-10/100 via torchvision; the official test split is the validation set."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    root = Path(os.path.expanduser(cfg.root))
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=True)
        except PermissionError as e:
            raise HeadstartError(
                f"cannot write {name} to {root}: {e}. Set data.root to a writable folder."
            ) from None
        except (URLError, OSError, RuntimeError) as e:
            archive = root / cls.filename
            present = (
                f" ({archive} exists but is incomplete or corrupt: replace it.)" if archive.exists() else ""
            )
            raise OfflineError(
                f"could not download {name} from {cls.url}: {e}.{present} Without network access, "
                f"download {cls.url} elsewhere and put the archive {cls.filename} (still packed) "
                f"in the folder {root}/; headstart then verifies and extracts it on the next run."
            ) from None
        data = np.ascontiguousarray(ds.data)  # (N, 32, 32, 3) uint8
        splits.append(
            ArrayDataset(data, ds.targets, ds.classes, name=f"{name} {'train' if train else 'test'}")
        )
    return DataBundle(splits[0], splits[1], list(splits[0].classes), name, 0, kind="photo")


def _folder(cfg: DataConfig, source: str, seed: int) -> DataBundle:
    """An ImageFolder-style directory, with or without ``train/`` and ``val/`` splits."""
    root = Path(os.path.expanduser(source))
    if not root.exists():
        looks_like_path = any(s in source for s in ("/", "\\", ".", "~")) or source == ""
        if looks_like_path:
            raise HeadstartError(
                f"data folder {root} does not exist, and {source!r} is not a known dataset "
                f"({', '.join(KNOWN_SOURCES)}); check the path"
            )
        raise HeadstartError(
            f"unknown data source {source!r}; use a known dataset ({', '.join(KNOWN_SOURCES)}) "
            f"or a path to an image folder with one subfolder per class"
        )
    if not root.is_dir():
        raise HeadstartError(f"data source {root} is a file; give a folder with one subfolder per class")

    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    train_dir = subdirs.get("train")
    val_dir = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)

    if train_dir is not None and val_dir is not None:
        log.info("using %s for training and %s for validation", train_dir, val_dir)
        train_items, train_bad = _scan_classes(train_dir)
        val_items, val_bad = _scan_classes(val_dir)
        bad = _handle_unreadable(train_bad + val_bad, root, cfg.strict)
        classes = _classes_of(train_items, train_dir)
        extra = sorted(set(c for _, c in val_items) - set(classes))
        if extra:
            raise HeadstartError(
                f"validation folder {val_dir} has class(es) {', '.join(extra)} with no training "
                f"images in {train_dir}; add training images for them or remove them from {val_dir.name}/"
            )
        if not val_items:
            raise HeadstartError(f"validation folder {val_dir} holds no readable images in class subfolders")
        train = _file_dataset(train_items, classes)
        val = _file_dataset(val_items, classes)
        return DataBundle(train, val, classes, str(root), len(bad), kind="photo")

    base = root
    if train_dir is not None:
        # train/ alone: hold out part of it, as for a plain class folder.
        log.info("no validation folder (%s) beside %s; splitting it", "/".join(VAL_DIR_NAMES), train_dir)
        base = train_dir
    items, bad_found = _scan_classes(base)
    bad = _handle_unreadable(bad_found, root, cfg.strict)
    classes = _classes_of(items, base)
    _check_val_split(cfg.val_split, str(base))
    full = _file_dataset(items, classes)
    tr, va = _stratified_split(full.targets, cfg.val_split, seed)
    return DataBundle(full.subset(tr), full.subset(va), classes, str(root), len(bad), kind="photo")


def folder_dataset(folder: str | Path, *, strict: bool = False) -> FileDataset:
    """Every readable image of a class-subfolder tree as one dataset (for evaluating a test set)."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise HeadstartError(f"data folder {root} does not exist")
    items, bad = _scan_classes(root)
    _handle_unreadable(bad, root, strict)
    classes = sorted({c for _, c in items})
    if not classes:
        raise HeadstartError(f"no images in class subfolders of {root}: put them in {root}/<class>/<image>")
    return _file_dataset(items, classes)


def _scan_classes(folder: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Readable ``(path, class)`` pairs in ``folder/<class>/...`` and ``(path, reason)`` failures."""
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    candidates = [(p, d.name) for d in class_dirs for p in _find_images(d)]
    bad = _check_images([p for p, _ in candidates])
    bad_paths = {p for p, _ in bad}
    good = [(p, c) for p, c in candidates if p not in bad_paths]
    return good, bad


def _classes_of(items: list[tuple[Path, str]], folder: Path) -> list[str]:
    """Sorted class names with at least one readable image; errors for fewer than two."""
    classes = sorted({c for _, c in items})
    loose = [p for p in folder.iterdir() if _is_image_file(p)]
    if not classes:
        found = f"found {len(loose)} image(s) directly in {folder} but " if loose else ""
        raise HeadstartError(
            f"{found}no images in class subfolders of {folder}; put each class's images in its own "
            f"subfolder: {folder}/<class>/<image> (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if loose:
        log.warning(
            "ignoring %d image(s) directly in %s (e.g. %s): images must sit in a subfolder named "
            "after their class", len(loose), folder, loose[0].name,
        )
    empty = sorted(
        d.name for d in folder.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name not in classes
    )
    if empty:
        log.warning("ignoring subfolder(s) of %s with no readable images: %s", folder, ", ".join(empty))
    if len(classes) < 2:
        raise HeadstartError(
            f"{folder} has only one class ({classes[0]}); a classifier needs at least two class "
            f"subfolders with images"
        )
    return classes


def _file_dataset(items: list[tuple[Path, str]], classes: list[str]) -> FileDataset:
    index = {c: i for i, c in enumerate(classes)}
    return FileDataset([p for p, _ in items], [index[c] for _, c in items], classes)


def _handle_unreadable(bad: list[tuple[Path, str]], root: Path, strict: bool) -> list[tuple[Path, str]]:
    """Raise (strict) or log one warning about unreadable images; returns them."""
    if not bad:
        return bad
    if strict:
        lines = [f"{p} ({why})" for p, why in bad]
        raise HeadstartError(
            f"{len(bad)} unreadable image(s) under {root}: {_listing(lines, _LIST_IN_ERROR)}. "
            f"Remove or re-export them, or set data.strict=false to skip them."
        )
    log.warning(
        "skipped %d unreadable image(s) under %s: %s (data.strict=true makes this an error)",
        len(bad), root, _listing([str(p) for p, _ in bad], _LIST_IN_WARNING),
    )
    return bad


# --------------------------------------------------------------------------- loaders


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container/taskset limits
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(dataset: Dataset) -> int:
    """Worker processes for ``dataset`` when the config says ``workers: null``.

    In-memory arrays (digits, CIFAR) and batch-transformed images get 0: their items cost
    microseconds to fetch, so worker start-up and inter-process transfer cost more than they
    save. Files and decoded images still resized per item get up to 4, leaving one core for the
    main process (0 on a single-core machine).
    """
    from headstart.data.memory import batched_transform

    inner = getattr(dataset, "dataset", dataset)  # look through torch Subset
    if getattr(inner, "in_memory", False) or batched_transform(inner) is not None:
        return 0
    return max(0, min(4, _usable_cpus() - 1))


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
    from headstart.data.memory import DeviceBatches, batched_transform

    batched = batched_transform(getattr(dataset, "dataset", dataset))
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
    inner = getattr(dataset, "dataset", dataset)
    return DeviceBatches(loader, batched, inner.batch_device, seed)  # type: ignore[return-value]
