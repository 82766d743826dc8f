"""Preprocessing metadata that travels with a backbone's weights.

Every pretrained checkpoint expects images prepared in one particular way (resize, centre crop,
mean/std, interpolation). That description lives in one dataclass, :class:`Preprocessing`, taken
from the weights' own metadata and saved inside every headstart checkpoint, so evaluation
transforms are built from it and never re-typed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """How images must be prepared for a backbone.

    ``resize`` is the length the shorter side is resized to, ``crop`` the square centre crop
    fed to the network (the model's input size).
    """

    crop: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    categories: list[str] = field(default_factory=list)

    def scaled(self, crop: int) -> "Preprocessing":
        """The same recipe at another input size, keeping the resize/crop ratio."""
        resize = max(crop, round(crop * self.resize / self.crop))
        return Preprocessing(crop, resize, self.mean, self.std, self.interpolation, list(self.categories))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @classmethod
    def from_torchvision(cls, weights: Any | None, default_crop: int = 224) -> "Preprocessing":
        """Read a torchvision ``WeightsEnum`` member's transforms and metadata.

        With no weights (random initialisation) the ImageNet recipe at ``default_crop`` is used.
        """
        if weights is None:
            return cls(crop=default_crop, resize=round(default_crop * 256 / 224))
        t = weights.transforms()
        crop = _first_int(getattr(t, "crop_size", default_crop))
        resize = _first_int(getattr(t, "resize_size", crop))
        interp = getattr(t, "interpolation", None)
        name = getattr(interp, "value", "bilinear") or "bilinear"
        return cls(
            crop=crop,
            resize=resize,
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=str(name),
            categories=list(weights.meta.get("categories") or []),
        )


def _first_int(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)
