"""The frozen body through ONNX Runtime, for feature extraction: verified at the first batch, PyTorch otherwise.

Head-only training spends nearly all its time running the frozen body once over the images (the
feature cache). On this project's CPU, ONNX Runtime ran MobileNetV2's body 5-7x faster than torch
eager at batch 32 (``bench/infer.py --body``), so :func:`fast_body` returns a drop-in replacement
for ``net.features``: on the first batch it exports the body, runs both engines, and keeps ONNX
Runtime only if its features equal PyTorch's within the fp32 tolerance; on any failure (no
onnxruntime, an export error, a difference) it says why in the log and stays with PyTorch.

``training.cache.extract(..., run=fast_body(net, device))`` is the intended call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from headstart.models import Network

from .verify import TOLERANCES

log = logging.getLogger(__name__)


class FastBody:
    """``net.features`` as a callable, run by ONNX Runtime once the first batch has verified it.

    ``engine`` is ``"pending"`` before the first batch, then ``"onnx"`` or ``"torch"``;
    ``reason`` says why it chose, with the measured difference.
    """

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
            self._stay(f"PyTorch: {self.device.type} / {x.dtype} runs natively")
            return
        try:
            from .convert import to_onnx
            from .runtime import onnx_runner

            run = onnx_runner(to_onnx(self.net, body_only=True)[0], threads=self.threads)
            got = run(_numpy(x))
        except Exception as e:  # noqa: BLE001 - any failure means: keep PyTorch
            self._stay(f"PyTorch: the ONNX body could not run ({type(e).__name__}: {str(e)[:200]})")
            return
        ref = reference.detach().float().cpu().numpy()
        diff = float(np.abs(ref - got).max()) if got.shape == ref.shape else float("inf")
        limit = TOLERANCES["onnx"]["max_abs_rel"] * max(1.0, float(np.abs(ref).max()))
        if not diff <= limit:
            self._stay(f"PyTorch: ONNX Runtime's features differ by {diff:.3g} (limit {limit:.3g})")
            return
        self._onnx, self.engine = run, "onnx"
        self.reason = f"ONNX Runtime: features equal PyTorch's within {diff:.3g} (limit {limit:.3g}) on the first batch"
        log.info("feature extraction for %s: %s", self.net.name, self.reason)

    def _stay(self, reason: str) -> None:
        self.engine, self.reason = "torch", reason
        log.info("feature extraction for %s: %s", self.net.name, reason)


def fast_body(net: Network, device: torch.device | str = "cpu", **kwargs: Any) -> FastBody:
    """The frozen body's forward for feature extraction, through ONNX Runtime when it verifies (see module doc)."""
    return FastBody(net, device, **kwargs)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
