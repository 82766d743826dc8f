"""What a trained model gets right and wrong on its validation images, for reports and notebooks.

:func:`interpret` rebuilds a model from its checkpoint alone, rebuilds the validation split the
run trained against (same source, seed, ``val_split`` and ``limit_val`` as the saved config, no
augmentation), runs it once and keeps every class probability. The returned
:class:`Interpretation` answers the usual questions from that one pass: the most confident
mistakes, the least confident correct answers, per-class scores worst first and the confusion
matrix; it keeps the dataset so thumbnails can be drawn (``raw_image``).

Example::

    >>> import headstart.evaluation.interpret as hi
    >>> interp = hi.interpret("runs/my-run")                        # doctest: +SKIP
    >>> for p in interp.top_mistakes(5):                            # doctest: +SKIP
    ...     print(p.description, p.true, "->", p.predicted, f"{p.confidence:.0%}")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from headstart.errors import HeadstartError
from headstart.evaluation.metrics import ClassReport, class_report


@dataclass
class Prediction:
    """One image's prediction: ``confidence`` is the probability given to ``predicted``."""

    index: int
    description: str
    true: str
    predicted: str
    confidence: float
    true_probability: float
    runner_up: str = ""  # the most probable class after ``predicted``
    runner_up_probability: float = 0.0

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass
class ClassScore:
    """One row of the per-class table."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    index: int


@dataclass
class Interpretation:
    """Predictions of a model on a dataset (one row of ``probs`` per image, in dataset order).

    ``dataset`` (when known) gives the untransformed images: ``interp.image(i)``.
    """

    classes: list[str]
    report: ClassReport
    probs: torch.Tensor  # [N, C] softmax probabilities
    targets: torch.Tensor  # [N] true class indices (in ``classes`` order)
    describe: list[str]  # file path or "digits #123" of each image
    dataset: Any = field(default=None, repr=False)
    source: str = ""
    split: str = "val"

    # ------------------------------------------------------------------ basics

    @property
    def preds(self) -> torch.Tensor:
        """Predicted class index of each image."""
        return self.probs.argmax(1)

    @property
    def confidence(self) -> torch.Tensor:
        """Probability of the predicted class for each image."""
        return self.probs.max(1).values

    def __len__(self) -> int:
        return len(self.targets)

    def prediction(self, i: int) -> Prediction:
        t, p = int(self.targets[i]), int(self.preds[i])
        others = self.probs[i].clone()
        others[p] = -1.0
        r = int(others.argmax()) if len(others) > 1 else p
        return Prediction(
            index=i,
            description=self.describe[i] if i < len(self.describe) else str(i),
            true=self.classes[t],
            predicted=self.classes[p],
            confidence=float(self.probs[i, p]),
            true_probability=float(self.probs[i, t]),
            runner_up=self.classes[r] if r != p else "",
            runner_up_probability=float(self.probs[i, r]) if r != p else 0.0,
        )

    def image(self, i: int) -> Image.Image:
        """Image ``i`` untransformed, as RGB (needs the dataset)."""
        if self.dataset is None:
            raise HeadstartError("this interpretation holds no dataset to draw images from")
        return self.dataset.raw_image(i)

    # ------------------------------------------------------------------ questions

    def top_mistakes(self, k: int = 16) -> list[Prediction]:
        """The ``k`` wrong predictions made with the highest confidence, most confident first."""
        wrong = torch.nonzero(self.preds != self.targets).flatten()
        return self._ranked(wrong, descending=True, k=k)

    def least_confident_correct(self, k: int = 16) -> list[Prediction]:
        """The ``k`` right predictions made with the lowest confidence, least confident first."""
        right = torch.nonzero(self.preds == self.targets).flatten()
        return self._ranked(right, descending=False, k=k)

    def _ranked(self, idx: torch.Tensor, *, descending: bool, k: int) -> list[Prediction]:
        if len(idx) == 0 or k <= 0:
            return []
        conf = self.confidence[idx]
        # Stable sort: equal confidences keep dataset order, so reports repeat exactly.
        order = torch.sort(conf, descending=descending, stable=True).indices[:k]
        return [self.prediction(int(idx[j])) for j in order]

    def per_class(self) -> list[ClassScore]:
        """Precision, recall, F1 and support of each class, worst F1 first (classes with no images last)."""
        r = self.report
        rows = [ClassScore(c, r.precision[i], r.recall[i], r.f1[i], r.support[i], i)
                for i, c in enumerate(r.classes)]
        return sorted(rows, key=lambda s: (s.support == 0, s.f1, s.recall, s.precision, -s.support, s.index))

    def confusion(self, normalised: bool = False) -> torch.Tensor:
        """The [true, predicted] matrix: counts, or each row as fractions of its class (0 for empty rows)."""
        cm = self.report.confusion
        if not normalised:
            return cm.clone()
        cm = cm.double()
        return cm / cm.sum(1, keepdim=True).clamp(min=1)

    def most_confused(self, k: int = 10) -> list[tuple[str, str, int]]:
        """The ``k`` largest off-diagonal cells: (true, predicted, count), largest first."""
        cm = self.report.confusion.clone()
        cm.fill_diagonal_(0)
        flat = cm.flatten()
        n = len(self.classes)
        top = torch.sort(flat, descending=True, stable=True)
        return [(self.classes[int(i) // n], self.classes[int(i) % n], int(v))
                for v, i in zip(top.values[:k], top.indices[:k]) if v > 0]


# ---------------------------------------------------------------------- building one


def interpret(
    ckpt_path_or_run_dir: str | Path,
    data_source: str | None = None,
    split: str = "auto",
    batch_size: int = 64,
    device: str = "auto",
) -> Interpretation:
    """Run a checkpoint (or a run folder's best model) over its validation images.

    The data is the checkpoint's saved ``data`` config with augmentation off: the same source,
    seed, ``val_split`` and ``limit_val``, so the images are the ones the run validated on.
    ``data_source`` points at other data instead (its labels are mapped to the checkpoint's
    classes; the run's ``limit_*`` do not apply to it). ``split`` is ``val``, ``train`` (the
    training images, without augmentation) or ``all`` (every image of a class folder).
    """
    from headstart.evaluation.evalset import evaluation_images
    from headstart.evaluation.inference import predict_logits
    from headstart.models import checkpoint
    from headstart.runtime.device import pick_device

    net, ckpt = checkpoint.load_network(ckpt_path_or_run_dir)
    classes = list(ckpt["classes"])
    dataset, source, split = evaluation_images(ckpt, net.preprocessing, data_source, split=split)
    dev = pick_device(device)
    net.to(dev)
    logits, targets = predict_logits(net, _loader(dataset, batch_size), dev)
    return Interpretation(
        classes=classes,
        report=class_report(logits, targets, classes),
        probs=logits.float().softmax(1),
        targets=targets.long(),
        describe=[dataset.describe(i) for i in range(len(dataset))],
        dataset=dataset,
        source=source,
        split=split,
    )


def _loader(dataset: Any, batch_size: int) -> Any:
    from headstart.data import make_loader

    # Worker processes cost more to start than a few hundred images take to read.
    workers = 0 if len(dataset) <= 512 else None
    return make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers, seed=0)


__all__ = ["ClassScore", "Interpretation", "Prediction", "interpret"]
