"""The ``headstart export`` subcommand, and the export-folder paths of ``predict`` and ``eval``.

``add_export_parser(subparsers)`` adds the subcommand to the CLI's parser and ``run_export(args)``
runs it (exit 0; a :class:`~headstart.errors.HeadstartError`, such as a failed verification,
is turned into exit 2 by the CLI). ``is_export`` lets ``predict``/``eval`` send an export folder
to :func:`predict_export` / :func:`evaluate_export`, which need nothing from the training run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The export folder's metadata file (= runtime.CONFIG), named here so building the CLI's parser
# does not import runtime, and numpy with it.
CONFIG = "config.json"


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``headstart export RUN_OR_CHECKPOINT --format onnx|torchscript|safetensors [--int8] [--out DIR]``."""
    e = subparsers.add_parser(
        "export", help="write a verified ONNX, TorchScript or plain-safetensors export with a model card",
        description="Convert a trained model, run the result beside the PyTorch model on the run's validation "
                    "images, and write a folder (model file, config.json, README.md model card) only when they "
                    "agree within the format's tolerance.")
    e.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder or a .pt checkpoint")
    e.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"],
                   help="onnx (ONNX Runtime, dynamic batch), torchscript (torch.jit.load), or safetensors (the "
                        "plain torchvision/timm model's key names)")
    e.add_argument("--int8", action="store_true", help="ONNX only: int8 quantisation with ONNX Runtime (static, "
                   "calibrated on training images, or dynamic: whichever measures better)")
    e.add_argument("--out", metavar="DIR", help="output folder (default: RUN/export-FORMAT)")
    e.add_argument("--check-images", metavar="DIR", help="verify on these images instead of the run's validation split")
    e.add_argument("--check-limit", type=int, default=1000, metavar="N",
                   help="verify on at most N validation images, evenly spread (default 1000)")
    e.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="training images that calibrate static int8 (default 256)")
    e.add_argument("--int8-calibration", choices=["percentile", "minmax", "entropy"], default="percentile",
                   help="how static int8 sets each activation's range: percentile (the 99.99th percentile "
                        "of its magnitudes; the default: EfficientNet-Lite0 lost 1.2-1.8 points with minmax), "
                        "minmax or entropy")
    e.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch's ONNX exporter: tracing, torch.export, or auto (tracing, then torch.export)")
    return e


def run_export(args: argparse.Namespace) -> int:
    from .export import export_model

    export_model(args.source, args.format, args.out, int8=args.int8, check_images=args.check_images,
                 check_limit=args.check_limit, calibration_images=args.calibration_images,
                 calibration=args.int8_calibration, exporter=args.exporter)
    return 0


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (as opposed to a checkpoint or run folder)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file()


def predict_export(path: str | Path, inputs: list[str], *, top_k: int, device: str = "cpu") -> list[dict[str, Any]]:
    """``headstart predict`` on an export folder: the records ``headstart.api.predict`` returns."""
    from .apply import predict_images
    from .runtime import open_predictor

    return predict_images(open_predictor(path, device=_device(device, path)), inputs, top_k_count=top_k)


def evaluate_export(path: str | Path, data: str, *, split: str = "auto", batch_size: int = 64, tta: bool = False,
                    device: str = "cpu", strict: bool = False) -> Any:
    """``headstart eval`` on an export folder: a :class:`~headstart.metrics.ClassReport`."""
    from .apply import evaluate_folder
    from .runtime import open_predictor

    return evaluate_folder(open_predictor(path, device=_device(device, path)), data, split=split, batch_size=batch_size,
                           tta=tta, strict=strict)


def _device(spec: str, path: str | Path) -> str:
    """``auto``: the GPU when there is one and the export's engine can use it, else the CPU."""
    if spec != "auto":
        return spec
    import json

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if json.loads((Path(path).expanduser() / CONFIG).read_text()).get("model_format") == "onnx":
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    return "cuda"
