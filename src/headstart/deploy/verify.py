"""Verification: an exported model is run beside the PyTorch model it came from, on real inputs.

An export that is not checked is a guess. :func:`compare` measures how far apart two models'
logits on the same batches are; :func:`check` turns a measurement outside its
format's tolerance into a :class:`~headstart.errors.HeadstartError` that gives the numbers.
Nothing here knows about files or engines: the caller runs ``(N,3,H,W) -> (N,C)`` functions
and passes their logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from headstart.errors import HeadstartError

# Largest allowed |logit difference| relative to the reference logits' scale (their largest
# magnitude, at least 1), and smallest allowed top-1 agreement, per format. fp32 engines differ
# only in the order of float additions and in fused kernels (1e-6 relative is typical, 1e-4
# leaves room for deep nets); within that bound top-1 can only flip on logits tied to 1e-4,
# so fp32 formats are judged by the difference alone. int8 changes the numbers by design and is
# judged by how often it picks the same class.
TOLERANCES: dict[str, dict[str, float]] = {
    "safetensors": {"max_abs_rel": 1e-5, "top1_agreement": 0.0},
    "torchscript": {"max_abs_rel": 1e-4, "top1_agreement": 0.0},
    "onnx": {"max_abs_rel": 1e-4, "top1_agreement": 0.0},
    "onnx-int8": {"max_abs_rel": float("inf"), "top1_agreement": 0.90},
}

Logits = Callable[[np.ndarray], np.ndarray]


@dataclass
class Verification:
    """How an export's logits compare with the PyTorch model's on ``images`` inputs."""

    format: str
    images: int
    inputs: str  # where the inputs came from: "validation split", "--check-images DIR", "random"
    max_abs_diff: float
    reference_scale: float  # largest |logit| of the reference (the scale the tolerance is relative to)
    top1_agreement: float
    tolerance_max_abs: float
    tolerance_top1: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["tolerance_max_abs"] == float("inf"):  # JSON has no infinity
            d["tolerance_max_abs"] = None
        return d

    def summary(self) -> str:
        tol = "no limit" if self.tolerance_max_abs == float("inf") else f"limit {self.tolerance_max_abs:.3g}"
        need = f" (limit {self.tolerance_top1:.0%})" if self.tolerance_top1 else ""
        return (f"{self.format}: max |logit diff| {self.max_abs_diff:.3g} ({tol}), top-1 agreement "
                f"{self.top1_agreement:.2%}{need} on {self.images} images ({self.inputs})")


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], *, fmt: str,
            inputs: str) -> Verification:
    """The largest logit difference and the top-1 agreement of two lists of logit batches."""
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    for ref, got in zip(reference, candidate, strict=True):
        ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            raise HeadstartError(f"the {fmt} export returns logits of shape {got.shape}, the model {ref.shape}")
        worst = max(worst, float(np.abs(ref - got).max()) if got.size else 0.0)
        if not np.isfinite(got).all():
            worst = float("inf")
        scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        total += len(ref)
    if total == 0:
        raise HeadstartError(f"no images to verify the {fmt} export on")
    tol = TOLERANCES[fmt]
    max_abs = tol["max_abs_rel"] * max(1.0, scale)
    top1 = agree / total
    return Verification(fmt, total, inputs, worst, scale, top1, max_abs, tol["top1_agreement"],
                        passed=worst <= max_abs and top1 >= tol["top1_agreement"])


def run_all(logits: Logits, batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """``logits`` of every batch, in order."""
    return [np.asarray(logits(x), dtype=np.float32) for x in batches]


def check(v: Verification, where: str) -> Verification:
    """``v`` if it passed, else a HeadstartError with its numbers (the caller writes no file)."""
    if not v.passed:
        raise HeadstartError(f"the export to {where} failed verification and was not written: {v.summary()}. "
                             "Report this with the model name; another --format may work meanwhile.")
    return v


def random_batches(shape: tuple[int, int, int], *, count: int = 8, batch: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs for a model with no images at hand: uniform values in the normalised range.

    Used only where no real image exists (a bare checkpoint served through ONNX); exports from a
    run are verified on its validation images. The first batch holds one input, so a graph whose
    batch axis is not really dynamic fails here.
    """
    rng = np.random.default_rng(seed)
    sizes = [1] + [batch] * ((count - 1) // batch) + ([(count - 1) % batch] if (count - 1) % batch else [])
    return [rng.uniform(-2.0, 2.0, size=(n, *shape)).astype(np.float32) for n in sizes if n]
