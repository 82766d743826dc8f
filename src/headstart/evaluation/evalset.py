"""Which images a trained model is evaluated on, and in which class order: one rule for
``headstart eval``, :func:`headstart.interpret` and the run report.

* No data source named (the report's default): the run's saved data config with augmentation
  off — the same source, seed, ``val_split`` and limits — so the images are the ones the run
  validated on and the numbers match its metrics.
* A data source named (``headstart eval`` always names one), even the run's own: its whole
  validation split with the run's ``val_split`` and seed (the run's ``limit_*`` do not apply);
  a plain class folder (no ``train/`` inside) is evaluated whole.
* ``split`` ``val``/``train`` chooses a side of the split, ``all`` every image of a class folder,
  ``auto`` the rule above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headstart.config import RunConfig, from_dict
from headstart.data import build_data, build_transform, folder_dataset
from headstart.errors import HeadstartError

SPLITS = ("auto", "val", "train", "all")


def evaluation_images(ckpt: dict[str, Any], pre: Any, data_source: str | None = None, *, split: str = "auto",
                      strict: bool | None = None) -> tuple[Any, str, str]:
    """(dataset with the evaluation transform and the checkpoint's class order, its source, the split used)."""
    if split not in SPLITS:
        raise HeadstartError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    if "config" not in ckpt and data_source is None:
        raise HeadstartError("the checkpoint has no saved config: give the data source to evaluate it on")
    cfg = from_dict(RunConfig, ckpt["config"]) if "config" in ckpt else RunConfig()
    dcfg = dataclasses.replace(cfg.data, augment=False, in_memory=False, balanced=False)
    if strict is not None:
        dcfg = dataclasses.replace(dcfg, strict=strict)
    own = data_source is None
    if not own:
        dcfg = dataclasses.replace(dcfg, source=str(data_source), limit_train=None, limit_val=None)
    if split == "auto":
        folder = Path(dcfg.source).expanduser()
        split = "all" if not own and folder.is_dir() and not (folder / "train").is_dir() else "val"
    if split == "all":
        dataset = folder_dataset(dcfg.source, strict=dcfg.strict)
    else:
        bundle = build_data(dcfg, pre, seed=cfg.train.seed)
        dataset = bundle.val if split == "val" else bundle.train
    if len(dataset) == 0:
        raise HeadstartError(f"no {split} images in {dcfg.source} to evaluate the model on")
    remap_targets(dataset, ckpt["classes"])
    kind = ckpt.get("kind") or getattr(dataset, "kind", "photo")
    dataset.transform = build_transform(pre, train=False, augment=False, kind=kind)
    return dataset, str(dcfg.source), split


def remap_targets(dataset: Any, model_classes: Sequence[str]) -> None:
    """Re-index a dataset's labels to the model's class order; its classes must be the model's."""
    unknown = [c for c in dataset.classes if c not in model_classes]
    if unknown:
        raise HeadstartError(
            f"the data has class(es) {unknown[:10]} that the checkpoint does not know; the checkpoint's "
            f"classes are {list(model_classes)[:20]}"
        )
    index = {c: i for i, c in enumerate(model_classes)}
    mapping = [index[c] for c in dataset.classes]
    dataset.targets = [mapping[t] for t in dataset.targets]
    dataset.classes = list(model_classes)
