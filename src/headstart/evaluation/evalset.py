"""Which images a trained model is evaluated on, and in which class order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from headstart.errors import HeadstartError


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
