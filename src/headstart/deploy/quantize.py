"""int8 ONNX models through ONNX Runtime's quantisation, static or dynamic, whichever measures better.

*Static* quantisation fixes every activation's int8 scale from calibration images (the run's
training images, eval transform; by default from the 99.99th percentile of each activation's
magnitudes, see :data:`CALIBRATIONS`) and stores weights per output channel; *dynamic* quantisation
stores int8 weights only and measures activation ranges at run time. :func:`quantize_best`
builds both, measures each one's speed against fp32 (alternated, median) and, when it is
faster, its top-1 on the validation images (against the labels or, without labels, agreement
with the fp32 model), and keeps the fastest one whose top-1 stays within ``max_drop`` of fp32,
else the most accurate.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import HeadstartError

from .convert import INPUT_NAME

# The top-1 loss (in points of accuracy) an int8 model may cost and still be chosen for speed.
MAX_DROP = 0.01
# How static quantisation sets each activation's range from the calibration images (ONNX Runtime's
# CalibrationMethod). Measured on clothing-small (bench/int8_options.py, 256 calibration images;
# bench/README.md, section 10): with min-max ranges EfficientNet-Lite0's top-1 changed by -1.2 to
# -1.8 points and 88.9% of its answers stayed fp32's; with the 99.99th percentile of each
# activation's magnitudes (rare outliers no longer stretch the scale) +0.9 points and 89.7% (93.6%
# on 1,000 unseen training photos), MobileNetV2 0.0 points and 96.2%; entropy did no better than min-max.
CALIBRATIONS = {"percentile": "Percentile", "minmax": "MinMax", "entropy": "Entropy"}
DEFAULT_CALIBRATION = "percentile"
PERCENTILE = 99.99


@dataclass
class Candidate:
    """One quantised model and what it measured."""

    method: str  # "static" | "dynamic"
    speedup: float  # images/s over fp32's, median of alternated rounds at the measured batch
    size_bytes: int
    # Against the labels, or agreement with fp32 where there are none; None: not measured,
    # because the model runs slower than fp32 and so is never chosen.
    top1: float | None = None
    top1_change: float | None = None  # top1 - fp32's top1 (a fraction: -0.004 = -0.4 points)
    data: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data")
        return d


def _quant() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise HeadstartError("--int8 needs onnxruntime: pip install onnxruntime") from None
    return quantization


class _Calibration:
    """ORT's CalibrationDataReader protocol over a list of batches (one input per call), with the
    ``len`` and ``set_range`` that let ORT collect ranges a slice of batches at a time."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = list(batches)
        self._at, self._end = 0, len(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._at >= self._end:
            return None
        self._at += 1
        return {INPUT_NAME: self._batches[self._at - 1]}

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._at, self._end = start_index, min(end_index, len(self._batches))

    def rewind(self) -> None:  # pragma: no cover - ORT calls it only with several passes
        self._at, self._end = 0, len(self._batches)


def quantize_static(fp32: bytes, calibration: Sequence[np.ndarray], *, per_channel: bool = True,
                    fmt: str = "QDQ", method: str = DEFAULT_CALIBRATION) -> bytes:
    """int8 weights and activations, scales from ``calibration`` batches (``method``: a key of
    :data:`CALIBRATIONS`).

    QDQ with uint8 activations and int8 per-channel weights is what ONNX Runtime's x86 kernels
    (VNNI, AMX) fuse into int8 convolutions; ``fmt="QOperator"`` writes QLinearConv nodes instead.
    Ranges are collected one batch at a time and merged, so memory stays at one batch of every
    activation (percentile ranges over all 256 images at once ran out of memory at 22 GB for
    EfficientNet-Lite0). ORT 1.32's ``CalibMaxIntermediateOutputs`` would drop the batches it
    clears instead of merging them, so it is not used.
    """
    if method not in CALIBRATIONS:
        raise HeadstartError(f"unknown int8 calibration {method!r}: use {', '.join(CALIBRATIONS)}")
    q = _quant()
    extra: dict[str, Any] = {"CalibStridedMinMax": 1}  # batches of the reader per collection
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(preprocessed(fp32, Path(tmp)))
        q.quantize_static(str(src), str(dst), _Calibration(calibration),
                          quant_format=q.QuantFormat.QDQ if fmt == "QDQ" else q.QuantFormat.QOperator,
                          per_channel=per_channel, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8,
                          calibrate_method=getattr(q.CalibrationMethod, CALIBRATIONS[method]), extra_options=extra)
        return dst.read_bytes()


def quantize_dynamic(fp32: bytes) -> bytes:
    """int8 weights, activations quantised at run time (no calibration)."""
    q = _quant()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(preprocessed(fp32, Path(tmp)))
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        return dst.read_bytes()


def preprocessed(fp32: bytes, tmp: Path) -> bytes:
    """The model after ORT's recommended pre-quantisation pass (shape inference, graph fusions)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = tmp / "raw.onnx", tmp / "pre.onnx"
    src.write_bytes(fp32)
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - the pass is an optimisation; quantising the raw graph still works
        return fp32
    return dst.read_bytes()


def top1(logits: Sequence[np.ndarray], targets: np.ndarray) -> float:
    pred = np.concatenate([b.argmax(1) for b in logits])
    return float((pred == targets).mean())


def speedup(fp32: Any, int8: Any, batch: np.ndarray, rounds: int = 5) -> float:
    """Median over alternated rounds of fp32 time / int8 time on ``batch`` (two runners)."""
    fp32(batch), int8(batch)  # warm-up: first runs allocate and pick kernels
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fp32(batch)
        t1 = time.perf_counter()
        int8(batch)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
        if ratios[0] < 0.5:  # clearly slower (dynamic ConvInteger): more rounds would only cost time
            break
    return float(np.median(ratios))


def quantize_best(fp32: bytes, fp32_logits: Sequence[np.ndarray], batches: Sequence[np.ndarray],
                  targets: np.ndarray | None, calibration: Sequence[np.ndarray], *,
                  max_drop: float = MAX_DROP, methods: Sequence[str] = ("static", "dynamic"),
                  calibration_method: str = DEFAULT_CALIBRATION) -> tuple[Candidate, list[Candidate]]:
    """Build each method's int8 model, measure it on ``batches``, return (chosen, all measured).

    ``targets`` are the labels of ``batches`` (None: top-1 is agreement with ``fp32_logits``);
    ``calibration_method`` sets static quantisation's ranges (see :data:`CALIBRATIONS`).
    """
    from .runtime import onnx_runner

    reference = targets if targets is not None else np.concatenate([b.argmax(1) for b in fp32_logits])
    base = top1(fp32_logits, reference)
    run_fp32 = onnx_runner(fp32)
    timing = np.concatenate(list(batches))[:32]
    found = []
    for method in methods:
        data = (quantize_static(fp32, calibration, method=calibration_method) if method == "static"
                else quantize_dynamic(fp32))
        run = onnx_runner(data)
        c = Candidate(method, speedup(run_fp32, run, timing), len(data), data=data)
        # Dynamic quantisation of convolutions runs ConvInteger, which measured 16x slower than
        # fp32 on MobileNetV2 here: a model slower than fp32 is never chosen, so its accuracy
        # would cost minutes for nothing (unless no candidate is faster: then the last one is).
        if c.speedup >= 1.0 or (method == methods[-1] and all(f.top1 is None for f in found)):
            c.top1 = top1([run(b) for b in batches], reference)
            c.top1_change = c.top1 - base
        found.append(c)
    measured = [c for c in found if c.top1 is not None]
    good = [c for c in measured if c.top1_change >= -max_drop]
    chosen = max(good, key=lambda c: c.speedup) if good else max(measured, key=lambda c: c.top1)
    return chosen, found
