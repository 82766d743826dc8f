"""Ship the model: verified exports (ONNX, TorchScript, plain safetensors), int8, and loading them anywhere.

``open_predictor(path)`` loads a run folder, a checkpoint or an export folder behind one small
interface (:class:`~headstart.deploy.runtime.Predictor`); ``export_model(source, fmt)`` writes
an export folder, verified against the PyTorch model before anything is written. Submodules are
imported on first use, so ``import headstart.deploy`` costs nothing until a model is touched.
"""

from __future__ import annotations

from typing import Any

_NAMES = {
    "Predictor": "runtime", "open_predictor": "runtime",
    "export_model": "export",
    "predict_images": "apply", "evaluate_folder": "apply",
}

__all__ = ["Predictor", "evaluate_folder", "export_model", "open_predictor", "predict_images"]


def __getattr__(name: str) -> Any:  # PEP 562: import the submodule on first use
    if name not in _NAMES:
        raise AttributeError(f"module 'headstart.deploy' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
