"""From a data config to a :class:`DataBundle`: the source, then what every source gets.

Example::

    >>> from headstart.config import DataConfig
    >>> from headstart.models.preprocess import Preprocessing
    >>> bundle = build_data(DataConfig(source="digits"), Preprocessing(crop=32, resize=36))
    >>> len(bundle.classes), len(bundle.train) + len(bundle.val)
    (10, 1797)
"""

from __future__ import annotations

import logging

from headstart.config import DataConfig
from headstart.data.bundle import DataBundle
from headstart.data.loaders import default_workers
from headstart.data.memory import hold_in_memory
from headstart.data.sources import open_source
from headstart.data.splits import apply_limit
from headstart.data.transforms import build_transform
from headstart.errors import HeadstartError
from headstart.models.preprocess import Preprocessing

log = logging.getLogger("headstart.data")


def build_data(cfg: DataConfig, pre: Preprocessing, *, seed: int = 0, progress: bool = False) -> DataBundle:
    """Build the train and validation datasets that ``cfg`` describes.

    ``pre`` gives the input size and normalisation; ``seed`` fixes the validation split and the
    ``limit_train``/``limit_val`` subsets. Image folders are decoded once into memory when they
    fit (``data.in_memory``, :mod:`headstart.data.memory`); ``progress`` shows and reports that.
    Raises :class:`HeadstartError` for unknown sources, bad folders or settings, and
    :class:`~headstart.errors.OfflineError` when a download is needed but fails.
    """
    bundle = open_source(cfg, seed)
    # Evaluation data is never augmented; only the train split gets the random transform.
    bundle.train.transform = build_transform(pre, train=True, augment=cfg.augment, kind=bundle.kind,
                                             policy=cfg.auto_augment)
    bundle.val.transform = build_transform(pre, train=False, augment=False, kind=bundle.kind)
    bundle.train = apply_limit(bundle.train, cfg.limit_train, seed, "limit_train")
    bundle.val = apply_limit(bundle.val, cfg.limit_val, seed, "limit_val")
    if len(bundle.val) == 0:
        raise HeadstartError(
            f"{str(cfg.source).strip()} leaves no images for validation (each class needs at least 2 images "
            "for a split); add images, raise data.val_split, or give train/ and val/ folders"
        )
    return hold_in_memory(bundle, enabled=cfg.in_memory, memory_gb=cfg.memory_gb, pre=pre,
                          workers=default_workers(bundle.train) if cfg.workers is None else cfg.workers,
                          progress=progress, say=print if progress else log.info)
