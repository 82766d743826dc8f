"""The frozen body through ONNX Runtime, for feature extraction: verified at the first batch, PyTorch otherwise.

Head-only training spends nearly all its time running the frozen body once over the images (the
feature cache). On this project's CPU, ONNX Runtime ran MobileNetV2's body 5-7x faster than torch
eager at batch 32 (``bench/infer.py --body``), so :func:`fast_body` returns a drop-in replacement
for ``net.features``: on the first batch it exports the body, runs both engines, and keeps ONNX
Runtime only if its features equal PyTorch's within the fp32 tolerance; on any failure (no
onnxruntime, an export error, a difference) it says why in the log and stays with PyTorch.

``training.cache.extract(..., run=fast_body(net, device))`` is the intended call; training gets it
through :func:`body_engine` (the ``cache.engine`` setting), handed down by ``jobs.train``, since
the training layer cannot import this one.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from headstart.models import Network

from .verify import TOLERANCES

log = logging.getLogger(__name__)
# Exporting, loading and verifying the ONNX body took 1-5 s here (MobileNetV2 at 224 px: 4-5 s);
# ONNX Runtime then saved 8 ms per 128 px image (EfficientNet-Lite0: 6,000 images in 16 s instead
# of 63 s, bench/cache_speedup.py), some 25 ms at 224 px. ``cache.engine: auto`` uses it for at
# least the pixels of 500 images at 224 px (over 10 s saved), never for a test's few tiny images.
AUTO_MIN_PIXELS = 500 * 224 * 224


class FastBody:
    """``net.features`` as a callable, run by ONNX Runtime once the first batch has verified it.

    ``engine`` is ``"pending"`` before the first batch, then ``"onnx"`` or ``"torch"``;
    ``reason`` says why it chose, with the measured difference. ``name`` is what the feature
    cache keys its entries by: the engine asked for (the one that ran is in the entry's description).
    """

    name = "onnx"

    def __init__(self, net: Network, device: torch.device | str = "cpu", *, threads: int | None = None) -> None:
        self.net, self.device, self.threads = net, torch.device(device), threads
        self.engine, self.reason = "pending", ""
        self._onnx: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "onnx":
            return torch.from_numpy(self._onnx(_numpy(x)))  # type: ignore[misc]
        with torch.inference_mode():
            out = self.net.features(x)
        if self.engine == "pending":
            self._choose(x, out)
        return out

    def _choose(self, x: torch.Tensor, reference: torch.Tensor) -> None:
        """Export the body and compare it with PyTorch's output on this batch; keep the winner."""
        if self.device.type != "cpu" or x.dtype != torch.float32:
            # On a GPU PyTorch's own kernels are the fast path; autocast inputs are not fp32.
            self._stay(f"PyTorch runs {self.device.type} / {x.dtype} natively")
            return
        if reference.dtype != torch.float32:  # under bf16 autocast: the ONNX body would be fp32
            self._stay(f"the features are {reference.dtype} (autocast), the ONNX body's fp32")
            return
        try:
            from .convert import to_onnx
            from .runtime import onnx_runner

            run = onnx_runner(to_onnx(self.net, body_only=True)[0], threads=self.threads)
            got = run(_numpy(x))
        except Exception as e:  # noqa: BLE001 - any failure means: keep PyTorch
            self._stay(f"the ONNX body could not run ({type(e).__name__}: {str(e)[:200]})")
            return
        ref = reference.detach().float().cpu().numpy()
        diff = float(np.abs(ref - got).max()) if got.shape == ref.shape else float("inf")
        limit = TOLERANCES["onnx"]["max_abs_rel"] * max(1.0, float(np.abs(ref).max()))
        if not diff <= limit:
            self._stay(f"its features differ by {diff:.3g} from PyTorch's (limit {limit:.3g})")
            return
        self._onnx, self.engine = run, "onnx"
        self.reason = (f"ONNX Runtime, verified: its features equal PyTorch's within {diff:.3g} (limit {limit:.3g}) "
                       "on the first batch")
        log.info("feature extraction for %s: %s", self.net.name, self.reason)

    def _stay(self, why: str) -> None:
        self.engine, self.reason = "torch", f"PyTorch (ONNX Runtime not used: {why})"
        log.info("feature extraction for %s: %s", self.net.name, self.reason)


def fast_body(net: Network, device: torch.device | str = "cpu", **kwargs: Any) -> FastBody:
    """The frozen body's forward for feature extraction, through ONNX Runtime when it verifies (see module doc)."""
    return FastBody(net, device, **kwargs)


def body_engine(setting: str) -> Callable[..., FastBody | None] | None:
    """What ``cache.engine`` asks for, as ``training.fit``'s ``body_engine``: None for PyTorch, else a
    factory ``(net, device, autocast dtype or None, images to extract) -> FastBody or None`` (None: PyTorch).

    ``auto`` takes ONNX Runtime only where it pays: on the CPU, at fp32, with onnxruntime
    installed, and for at least :data:`AUTO_MIN_PIXELS` of images (exporting and verifying the
    body costs seconds); ``onnx`` tries it wherever the whole body is cached and says why it fell back.
    """
    if setting == "torch" or (setting == "auto" and importlib.util.find_spec("onnxruntime") is None):
        return None

    def make(net: Network, device: torch.device, dtype: Any = None, images: int | None = None) -> FastBody | None:
        if setting == "auto":
            pixels = (images if images is not None else 0) * net.preprocessing.crop**2
            if torch.device(device).type != "cpu" or dtype is not None or pixels < AUTO_MIN_PIXELS:
                return None
        return FastBody(net, device, threads=torch.get_num_threads())

    return make


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
