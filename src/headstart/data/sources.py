"""Data sources: what a ``data.source`` value names, behind one registry.

A source is a function ``(cfg, seed) -> DataBundle`` registered with :func:`register_source` under
the names it answers to (any case); the one registered with ``fallback=True`` answers every other
value, and reads it as a folder path. Three sources are built in:

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (no download, handy for smoke runs);
* ``cifar10`` / ``cifar100``: downloaded once by torchvision into ``data.root``;
* a folder path in ImageFolder layout: ``folder/<class>/<image>``, or ``folder/train/<class>/...``
  beside ``folder/val/<class>/...`` (``valid/``, ``validation/`` and ``test/`` are accepted too).

Adding a source is one decorated function, here or in a module of its own imported at the end
of this one (2 files). :func:`headstart.data.build_data` then adds the transforms, the limits and
the in-memory copy, the same for every source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import numpy as np

from headstart.config import DataConfig
from headstart.data.bundle import DataBundle
from headstart.data.datasets import ArrayDataset
from headstart.data.folders import classes_of, file_dataset, handle_unreadable, new_scan, scan_classes
from headstart.data.splits import check_val_split, stratified_split
from headstart.errors import HeadstartError, OfflineError

log = logging.getLogger("headstart.data")

SourceFn = Callable[[DataConfig, int], DataBundle]
#: data.source name (lower case) -> the function building its bundle.
SOURCES: dict[str, SourceFn] = {}
_FALLBACK: list[SourceFn] = []  # the source of every other value (folder paths)
#: Names accepted for the validation split folder beside ``train/``, in order of preference.
VAL_DIR_NAMES = ("val", "valid", "validation", "test")


def register_source(*names: str, fallback: bool = False) -> Callable[[SourceFn], SourceFn]:
    """Register ``fn(cfg, seed) -> DataBundle`` as the source of ``data.source`` values ``names``.

    ``fallback=True`` makes it the source of every value no name matches (there is one: folders).
    """
    def register(fn: SourceFn) -> SourceFn:
        for name in names:
            SOURCES[name.lower()] = fn
        if fallback:
            _FALLBACK[:] = [fn]
        return fn

    return register


def known_sources() -> list[str]:
    """The registered source names, in registration order."""
    return list(SOURCES)


def open_source(cfg: DataConfig, seed: int) -> DataBundle:
    """The bundle of ``cfg.source`` as its source builds it (no transforms, limits or in-memory copy)."""
    fn = SOURCES.get(str(cfg.source).strip().lower())
    if fn is None:
        fn = _FALLBACK[0]
    return fn(cfg, seed)


# --------------------------------------------------------------------------- built-in sources


@register_source("digits")
def digits(cfg: DataConfig, seed: int) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits as 8-bit grayscale, split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_val_split(cfg.val_split, "digits")
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0–16
    classes = [str(i) for i in range(10)]
    ids = np.arange(len(images))
    tr, va = train_test_split(ids, test_size=cfg.val_split, random_state=seed, stratify=d.target)
    tr, va = np.sort(tr), np.sort(va)
    full = ArrayDataset(images, d.target, classes, name="digits")
    return DataBundle(full.subset(tr), full.subset(va), classes, "digits", 0, kind="digits")


@register_source("cifar10", "cifar100")
def cifar(cfg: DataConfig, seed: int) -> DataBundle:
    """CIFAR-10/100 via torchvision; the official test split is the validation set."""
    import torchvision.datasets as tvd

    name = str(cfg.source).strip().lower()
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


@register_source(fallback=True)
def image_folder(cfg: DataConfig, seed: int) -> DataBundle:
    """An ImageFolder-style directory, with or without ``train/`` and ``val/`` splits."""
    source = str(cfg.source).strip()
    root = Path(os.path.expanduser(source))
    _check_folder(root, source)
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    train_dir = subdirs.get("train")
    val_dir = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)

    if train_dir is not None and val_dir is not None:
        log.info("using %s for training and %s for validation", train_dir, val_dir)
        # One scan for both: a file found under train/ is not taken again for val/.
        scan = new_scan(root, train_dir, val_dir)
        train_items, train_bad = scan_classes(train_dir, scan)
        val_items, val_bad = scan_classes(val_dir, scan)
        scan.warn(root)
        bad = handle_unreadable(train_bad + val_bad, root, cfg.strict)
        classes = classes_of(train_items, train_dir)
        extra = sorted(set(c for _, c in val_items) - set(classes))
        if extra:
            raise HeadstartError(
                f"validation folder {val_dir} has class(es) {', '.join(extra)} with no training "
                f"images in {train_dir}; add training images for them or remove them from {val_dir.name}/"
            )
        if not val_items:
            raise HeadstartError(f"validation folder {val_dir} holds no readable images in class subfolders")
        train = file_dataset(train_items, classes)
        val = file_dataset(val_items, classes)
        return DataBundle(train, val, classes, str(root), len(bad) + scan.repeated_files, kind="photo")

    base = root
    if train_dir is not None:
        # train/ alone: hold out part of it, as for a plain class folder.
        log.info("no validation folder (%s) beside %s; splitting it", "/".join(VAL_DIR_NAMES), train_dir)
        base = train_dir
    scan = new_scan(root, base)
    items, bad_found = scan_classes(base, scan)
    scan.warn(root)
    bad = handle_unreadable(bad_found, root, cfg.strict)
    classes = classes_of(items, base)
    check_val_split(cfg.val_split, str(base))
    full = file_dataset(items, classes)
    tr, va = stratified_split(full.targets, cfg.val_split, seed)
    return DataBundle(full.subset(tr), full.subset(va), classes, str(root), len(bad) + scan.repeated_files,
                      kind="photo")


def _check_folder(root: Path, source: str) -> None:
    if not root.exists():
        names = ", ".join(known_sources())
        looks_like_path = any(s in source for s in ("/", "\\", ".", "~")) or source == ""
        if looks_like_path:
            raise HeadstartError(
                f"data folder {root} does not exist, and {source!r} is not a known dataset "
                f"({names}); check the path"
            )
        raise HeadstartError(
            f"unknown data source {source!r}; use a known dataset ({names}) "
            f"or a path to an image folder with one subfolder per class"
        )
    if not root.is_dir():
        raise HeadstartError(f"data source {root} is a file; give a folder with one subfolder per class")
