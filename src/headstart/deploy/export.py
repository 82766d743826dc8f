"""``headstart export``: one self-contained, verified folder per model.

:func:`export_model` reads a run folder or checkpoint, converts the model (ONNX, TorchScript or
plain safetensors under the library's own key names), runs the result beside the PyTorch model
on the run's validation images (or ``check_images``), and writes the folder only when the two
agree within the format's tolerance (:mod:`headstart.deploy.verify`)::

    export-onnx/
      model.onnx      the model file (model.int8.onnx with int8=True, model.pt, model.safetensors)
      config.json     arch, source, classes, preprocessing, input, verification, int8 measurements
      README.md       the model card: data, validation metrics, how to load it, limits

Example::

    >>> export_model("runs/pets", "onnx")               # doctest: +SKIP
    PosixPath('runs/pets/export-onnx')
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import HeadstartError
from headstart.models import Network
from headstart.version import __version__

from . import convert, verify
from .card import model_card
from .runtime import CARD, CONFIG, EXPORT_FORMAT, checkpoint_file, checkpoint_metadata, torch_runner
from .samples import Samples, check_samples, training_samples

FORMATS = ("onnx", "torchscript", "safetensors")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": "model.safetensors"}


@dataclass
class Converted:
    """A converted model: its files' bytes, what config.json should add, and its logits on the checks."""

    files: dict[str, bytes]
    config: dict[str, Any]
    logits: list[np.ndarray] = field(default_factory=list)


def export_model(source: str | Path, fmt: str, out: str | Path | None = None, *, int8: bool = False,
                 check_images: str | Path | None = None, check_limit: int = 1000, calibration_images: int = 256,
                 calibration: str = "percentile", exporter: str = "auto", say: Callable[[str], None] = print) -> Path:
    """Write a verified export of ``source`` (run folder or ``.pt``) in ``fmt``; returns the folder.

    ``int8`` (ONNX only) quantises with ONNX Runtime, static (calibrated on ``calibration_images``
    training images, activation ranges by ``calibration``: percentile, minmax or entropy) or
    dynamic, whichever measures better (:mod:`headstart.deploy.quantize`).
    Verification images are the run's validation split, at most ``check_limit`` of them evenly
    spread, or every image under ``check_images``. Raises :class:`HeadstartError` (and writes
    nothing) when verification fails.
    """
    from headstart.models import load_network, read_checkpoint

    if fmt not in FORMATS:
        raise HeadstartError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise HeadstartError("--int8 quantises with ONNX Runtime: use it with --format onnx")
    from .quantize import CALIBRATIONS

    if calibration not in CALIBRATIONS:
        raise HeadstartError(f"unknown int8 calibration {calibration!r}: use {', '.join(CALIBRATIONS)}")
    ckpt_path = checkpoint_file(Path(source).expanduser())
    ckpt = read_checkpoint(ckpt_path)
    net, _ = load_network(ckpt)
    target = _target_folder(Path(out) if out else _default_out(Path(source), ckpt_path, fmt, int8))
    checks = check_samples(ckpt, check_images, limit=check_limit)
    say(f"verifying on {checks.count} images ({checks.inputs})")
    reference = verify.run_all(torch_runner(net, "cpu"), checks.batches)
    result = _convert(net, fmt, exporter, checks)
    v = verify.check(verify.compare(reference, result.logits, fmt=fmt, inputs=checks.inputs), MODEL_FILES[fmt])
    say(v.summary())
    if int8:
        result, v = _int8(result, ckpt, reference, checks, (calibration_images, calibration), say)
    meta = _config(ckpt, ckpt_path, fmt, result, v)
    evaluation = _evaluation(reference, result.logits, checks, meta["classes"])
    run_dir = ckpt_path.parent if (ckpt_path.parent / "summary.json").is_file() else None
    meta["evaluation"] = {k: evaluation[k] for k in ("top1", "export_top1", "images")} if evaluation else None
    card = model_card(meta, ckpt, run_dir, evaluation)
    _write_folder(target, result.files, meta, card)
    say(f"export written to {target}")
    return target


def _default_out(source: Path, ckpt_path: Path, fmt: str, int8: bool) -> Path:
    name = f"export-{fmt}{'-int8' if int8 else ''}"
    return (source / name) if source.is_dir() else ckpt_path.with_name(f"{ckpt_path.stem}-{name}")


def _target_folder(out: Path) -> Path:
    """``out`` if it is free or a previous export (replaced); refuse to overwrite anything else."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise HeadstartError(f"--out {out} exists and is not a headstart export: choose another folder")
    return out


def _convert(net: Network, fmt: str, exporter: str, checks: Samples) -> Converted:
    """The model file's bytes in ``fmt``, run on the check images by its own engine."""
    from .runtime import library_runner, onnx_runner, torchscript_runner

    name = MODEL_FILES[fmt]
    if fmt == "onnx":
        data, used = convert.to_onnx(net, exporter=exporter)
        conf = {"onnx": {"opset": convert.OPSET, "exporter": used, "input": convert.INPUT_NAME,
                         "output": convert.OUTPUT_NAME}}
        run = onnx_runner(data)
    elif fmt == "torchscript":
        data, conf = convert.to_torchscript(net), {"torchscript": {"method": "torch.jit.trace"}}
        run = torchscript_runner(data, "cpu")
    else:
        data, conf = _safetensors(net)
        run = library_runner(conf, data, "cpu")
    files = {name: data}
    if fmt == "safetensors" and conf["library"]["head"] == "custom":
        files["head.safetensors"] = _head_only(data, conf["library"]["classifier"])
    return Converted(files, conf | {"model_file": name}, verify.run_all(run, checks.batches))


def _safetensors(net: Network) -> tuple[bytes, dict[str, Any]]:
    from safetensors.torch import save

    from .library import library_weights

    state, spec = library_weights(net)
    return save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}), {"library": spec}


def _head_only(data: bytes, classifier: str) -> bytes:
    """The classifier's tensors alone, under names relative to the classifier."""
    from safetensors.torch import load, save

    prefix = classifier + "."
    return save({k[len(prefix):]: v for k, v in load(data).items() if k.startswith(prefix)})


def _int8(fp32: Converted, ckpt: dict[str, Any], reference: list[np.ndarray], checks: Samples,
          calibrate: tuple[int, str], say: Callable[[str], None]) -> tuple[Converted, verify.Verification]:
    """Quantise the verified fp32 ONNX model, measure static and dynamic, keep the better one.

    ``calibrate``: how many training images set static int8's ranges, and by which method.
    """
    from .quantize import quantize_best

    count, method = calibrate
    calibration = training_samples(ckpt, limit=count)
    say(f"int8: calibrating ({method} ranges) on {calibration.count} training images, measuring on "
        f"{checks.count} ({checks.inputs})")
    chosen, found = quantize_best(fp32.files["model.onnx"], fp32.logits, checks.batches, checks.targets,
                                  calibration.batches, calibration_method=method)
    for c in found:
        acc = "top-1 not measured" if c.top1 is None else f"top-1 {c.top1:.2%} ({c.top1_change * 100:+.1f} points)"
        say(f"int8 {c.method}: {c.speedup:.2f}x fp32 speed, {acc}")
    from .runtime import onnx_runner

    logits = verify.run_all(onnx_runner(chosen.data), checks.batches)
    v = verify.check(verify.compare(reference, logits, fmt="onnx-int8", inputs=checks.inputs), "model.int8.onnx")
    conf = dict(fp32.config) | {"model_file": "model.int8.onnx", "precision": "int8",
                                "int8": {"method": chosen.method, "calibration_images": calibration.count,
                                         "calibration": method,
                                         "measured_on": checks.inputs, "top1_basis": checks.top1_basis,
                                         "candidates": [c.to_dict() for c in found]}}
    return Converted({"model.int8.onnx": chosen.data}, conf, logits), v


def _config(ckpt: dict[str, Any], ckpt_path: Path, fmt: str, result: Converted,
            v: verify.Verification) -> dict[str, Any]:
    meta = checkpoint_metadata(ckpt, ckpt_path)
    meta.pop("card", None)
    cfg = ckpt.get("config") or {}
    crop = int(meta["preprocessing"]["crop"])
    meta |= {
        "format": EXPORT_FORMAT,
        "headstart_version": __version__,
        "model_format": fmt,
        "precision": "fp32",
        "input": {"name": convert.INPUT_NAME, "shape": ["batch", 3, crop, crop], "dtype": "float32",
                  "layout": "NCHW", "color": "RGB", "normalised": True},
        "output": {"name": convert.OUTPUT_NAME, "shape": ["batch", meta["num_classes"]], "meaning": "logits"},
        # Enough of the training config to rebuild the same validation split from the export alone.
        "training": {"data": cfg.get("data", {}).get("source"), "val_split": cfg.get("data", {}).get("val_split"),
                     "limit_val": cfg.get("data", {}).get("limit_val"), "seed": cfg.get("train", {}).get("seed"),
                     "weights": cfg.get("model", {}).get("weights")},
    } | result.config
    meta["verification"] = v.to_dict()
    return meta


def _evaluation(reference: list[np.ndarray], exported: list[np.ndarray], checks: Samples,
                classes: list[str]) -> dict[str, Any] | None:
    """Per-class scores of the PyTorch model on labelled check images, with the export's top-1."""
    if checks.targets is None:
        return None
    import torch

    from headstart.evaluation import class_report

    targets = torch.from_numpy(checks.targets)
    report = class_report(torch.from_numpy(np.concatenate(reference)), targets, classes).to_dict()
    mine = class_report(torch.from_numpy(np.concatenate(exported)), targets, classes)
    return report | {"export_top1": mine.top1, "images": int(len(targets))}


def _write_folder(target: Path, files: dict[str, bytes], meta: dict[str, Any], card: str) -> None:
    """Write into a temporary sibling, then swap it in: a reader never sees half an export."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / CARD).write_text(card)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
