"""Predict and evaluate with any :class:`~headstart.deploy.runtime.Predictor`: an export needs nothing from the run.

``headstart predict EXPORT_DIR IMAGES...`` and ``headstart eval EXPORT_DIR --data ...`` call these
with the predictor of an export folder; given a checkpoint's predictor they give the same answers
as ``headstart.api.predict`` / ``evaluate_checkpoint``, within the export's recorded tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.errors import HeadstartError
from headstart.evaluation import ClassReport, class_report

from .runtime import Predictor, eval_transform


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(predictor: Predictor, logits: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """For each row of logits, the ``k`` likeliest classes as ``{"class", "probability"}``, best first."""
    probs = softmax(logits.astype(np.float64))
    k = max(1, min(k, len(predictor.classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": predictor.classes[j], "probability": float(p[j])} for j in row] for row, p in zip(order, probs)]


def predict_images(predictor: Predictor, inputs: Sequence[str | Path], *, top_k_count: int = 5,
                   batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify image files (folders are searched): ``[{"file", "top": [{"class", "probability"}]}]``.

    The same records as :func:`headstart.api.predict`.
    """
    from headstart.data import list_images, load_image

    paths: list[Path] = []
    for item in inputs:
        paths += list_images(item)
    out = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = np.stack([predictor.preprocess(load_image(p)) for p in chunk])
        for p, tops in zip(chunk, top_k(predictor, predictor.logits(x), top_k_count)):
            out.append({"file": str(p), "top": tops})
    return out


def evaluate_folder(predictor: Predictor, data_source: str, *, split: str = "auto", batch_size: int = 64,
                    tta: bool = False, strict: bool = False) -> ClassReport:
    """Top-1/top-5, per-class scores and confusion matrix of ``predictor`` on a data source.

    As :func:`headstart.api.evaluate_checkpoint`: a plain class folder is evaluated whole
    (``split="auto"``), a source with a validation split on that split; the split of a source
    without one (``digits``, a folder of classes with ``split="val"``) is rebuilt from the
    export's record of the training run (``val_split``, ``seed``).
    """
    from headstart.data import make_loader

    dataset = _dataset(predictor, data_source, split, strict)
    _remap(dataset, predictor.classes)
    dataset.transform = eval_transform(predictor.metadata)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=None, seed=0)
    outs, targets = [], []
    for x, y in loader:
        batch = x.numpy()
        logits = predictor.logits(batch)
        if tta:  # as the engine does: mean of the plain and mirrored views' probabilities
            mirrored = predictor.logits(np.ascontiguousarray(batch[..., ::-1]))
            logits = np.log((softmax(logits) + softmax(mirrored)) / 2)
        outs.append(torch.from_numpy(np.asarray(logits, dtype=np.float32)))
        targets.append(y)
    return class_report(torch.cat(outs), torch.cat(targets), list(predictor.classes))


def _dataset(predictor: Predictor, source: str, split: str, strict: bool) -> Any:
    from headstart.config import DataConfig
    from headstart.data import build_data, folder_dataset
    from headstart.models import Preprocessing

    folder = Path(source).expanduser()
    if split == "all" or (split == "auto" and folder.is_dir() and not (folder / "train").is_dir()):
        return folder_dataset(source, strict=strict)
    training = predictor.metadata.get("training") or {}
    cfg = DataConfig(source=source, augment=False, strict=strict, in_memory=False)
    if training.get("val_split") is not None:
        cfg.val_split = float(training["val_split"])
    if training.get("limit_val") is not None and training.get("data") == source:
        cfg.limit_val = int(training["limit_val"])
    bundle = build_data(cfg, Preprocessing.from_dict(predictor.metadata["preprocessing"]),
                        seed=int(training.get("seed") or 0))
    return bundle.val if split in ("auto", "val") else bundle.train


def _remap(dataset: Any, classes: Sequence[str]) -> None:
    """Re-index the data's labels to the model's class order; every data class must be the model's."""
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise HeadstartError(f"the data has class(es) {unknown[:10]} that the model does not know; its classes "
                             f"are {list(classes)[:20]}")
    index = {c: i for i, c in enumerate(classes)}
    mapping = [index[c] for c in dataset.classes]
    dataset.targets = [mapping[t] for t in dataset.targets]
    dataset.classes = list(classes)
