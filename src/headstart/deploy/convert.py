"""Turn a trained :class:`~headstart.network.Network` into the bytes of a portable model file.

``to_onnx`` and ``to_torchscript`` return the file's bytes and write nothing: the caller verifies
them first (:mod:`headstart.deploy.verify`) and only then puts them on disk. Every graph takes the
normalised float tensor ``(N, 3, H, W)`` (the model's own eval transform already applied, see the
export's ``config.json``) and returns logits ``(N, C)``; the batch axis is dynamic.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from headstart.errors import HeadstartError
from headstart.models import Network

log = logging.getLogger(__name__)

# Opset 18 (ONNX 1.13, 2022) is run by every ONNX Runtime since 1.14 and is the lowest opset the
# newer torch.export-based exporter writes, so both exporters below give the same opset.
OPSET = 18
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "input", "logits", "features"


class _Logits(nn.Module):
    """The network as one plain ``forward(x)`` for tracing: its logits, or its body's features."""

    def __init__(self, net: Network, body_only: bool = False) -> None:
        super().__init__()
        self.net, self.body_only = net, body_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x) if self.body_only else self.net(x)


def _frozen_copy(net: Network, body_only: bool = False) -> nn.Module:
    """A CPU copy in eval mode with no gradients: exporting never moves or changes the caller's model."""
    model = _Logits(copy.deepcopy(net).cpu().eval(), body_only)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def example_input(net: Network, batch: int = 2) -> torch.Tensor:
    size = net.preprocessing.crop
    return torch.zeros(batch, 3, size, size)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Both tracers warn about Python control flow they fold into constants (shape checks in
    # attention layers); the export is verified on real inputs of two batch sizes instead, so
    # these warnings would only alarm a user about a result that is checked anyway. The
    # TorchScript-based ONNX exporter also announces its own deprecation on every call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield


def to_onnx(net: Network, *, opset: int = OPSET, exporter: str = "auto",
            body_only: bool = False) -> tuple[bytes, str]:
    """``(model bytes, exporter used)``: an ONNX graph with a dynamic batch axis.

    ``body_only``: the frozen body alone, ``(N, 3, H, W) -> features`` (for the feature cache).

    ``exporter``: ``torchscript`` (torch's tracing exporter), ``dynamo`` (its torch.export-based
    one) or ``auto``: tracing first, because it exported the test models 5-15x faster here
    (2-5 s against 15-35 s) and the result is verified either way; ``dynamo`` if tracing fails or
    is gone from a future torch.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise HeadstartError(f"unknown ONNX exporter {exporter!r}: use auto, torchscript or dynamo")
    model, x = _frozen_copy(net, body_only), example_input(net)
    output = FEATURES_NAME if body_only else OUTPUT_NAME
    if exporter in ("auto", "torchscript"):
        try:
            return _onnx_by_tracing(model, x, opset, output), "torchscript"
        except Exception as e:  # noqa: BLE001 - any exporter failure means: try the other one
            if exporter == "torchscript":
                raise HeadstartError(f"ONNX export of {net.name} failed: {_first_line(e)}") from None
            log.info("tracing ONNX exporter failed on %s (%s); trying torch.export", net.name, _first_line(e))
    try:
        return _onnx_by_dynamo(model, x, opset, output), "dynamo"
    except Exception as e:  # noqa: BLE001
        raise HeadstartError(f"ONNX export of {net.name} failed with both exporters: {_first_line(e)}. "
                             "Try --format torchscript or safetensors.") from None


def _onnx_by_tracing(model: nn.Module, x: torch.Tensor, opset: int, output: str) -> bytes:
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[output], dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
                          do_constant_folding=True)
    return buf.getvalue()


def _onnx_by_dynamo(model: nn.Module, x: torch.Tensor, opset: int, output: str) -> bytes:
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=[output], verbose=False,
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return program.model_proto.SerializeToString()


def to_torchscript(net: Network, *, body_only: bool = False) -> bytes:
    """The bytes of a traced TorchScript module (``torch.jit.load`` reads them; no headstart needed)."""
    model, x = _frozen_copy(net, body_only), example_input(net)
    try:
        with _quiet(), torch.no_grad():
            # check_trace compares two traces' graphs and fails on harmless renumbering (ViT);
            # the export is verified on real images instead.
            traced = torch.jit.trace(model, x, check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise HeadstartError(f"TorchScript export of {net.name} failed: {_first_line(e)}. Try --format onnx.") from None
    buf = io.BytesIO()
    with _quiet():
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
