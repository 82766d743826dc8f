"""Benchmark (issue 11): batch inference through torch eager, TorchScript, ONNX Runtime fp32 and int8.

For MobileNetV2 (torchvision ``IMAGENET1K_V1``) and EfficientNet-Lite0 (timm, packaged ImageNet
weights), each given a 10-class head trained by headstart on clothing-small's training split
(1,000 of its 3,068 images, class-stratified; the frozen body's features are cached, 5 head
epochs: a real model of the kind users export),
at 224 px on this CPU:

1. ``headstart export RUN --format onnx --int8`` (the product path) quantises it statically
   (calibrated on 256 training images) and dynamically, and measures each one's top-1 on the
   341 validation images against fp32's; the chosen model's top-1 change is reported.
2. images/s of ``model(x)`` at batch 1 and 32 for torch eager (``inference_mode``), TorchScript
   (traced), ORT fp32 and ORT int8 (the exported file). Contenders alternate inside each round
   (their order rotates), so a drift of the machine's speed hits all of them alike; each reports
   its median images/s and the median of its per-round ratio to torch eager.
3. ``--body``: the same for the frozen body alone, and feature extraction end to end as the
   cache runs it (``training.cache.extract`` over 512 training images: decoding, resizing, the
   body, writing) with PyTorch against ``headstart.deploy.features.fast_body`` (item 6).

One JSON line per model and batch size (and one per model for the accuracy) on stdout::

    flock /tmp/headstart-cpu.lock python bench/infer.py            # both models, batches 1 and 32
    flock /tmp/headstart-cpu.lock python bench/infer.py --body     # and the frozen body, extraction
    flock /tmp/headstart-cpu.lock python bench/infer.py --quick    # mobilenet_v2, fewer rounds
"""

from __future__ import annotations

import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {"mobilenet_v2": "IMAGENET1K_V1", "timm:tf_efficientnet_lite0": "DEFAULT"}
TARBALL = "clothing-small.tar.gz"


def clothing(args: Any) -> Path:
    """clothing-small unpacked under the work folder (``train/`` and ``validation/``)."""
    root = Path(args.work_dir) / "clothing-small"
    if not (root / "train").is_dir():
        tar = Path(args.data_dir) / TARBALL
        if not tar.is_file():
            common.skip("infer", f"{tar} is absent")
        common.log(f"unpacking {tar}")
        with tarfile.open(tar) as t:
            t.extractall(Path(args.work_dir), filter="data")
    return root


def train_run(name: str, weights: str, data: Path, args: Any) -> Path:
    """A headstart run: frozen ImageNet body, new 10-class head, 5 epochs from cached features."""
    import headstart as hs

    out = Path(args.work_dir) / "infer-runs"
    run = out / name.replace(":", "-")
    if (run / "best.pt").is_file() and not args.retrain:
        return run
    cfg = hs.RunConfig()
    cfg.model.name, cfg.model.weights, cfg.data.source = name, weights, str(data)
    cfg.train.epochs, cfg.train.finetune_epochs, cfg.train.progress = 5, 0, False
    cfg.data.limit_train = args.limit_train  # a class-stratified subset keeps the torch extraction short
    cfg.output, cfg.name, cfg.report, cfg.tensorboard = str(out), run.name, False, False
    cfg.cache.dir = str(Path(args.work_dir) / "infer-cache")
    if run.exists():  # a run interrupted before best.pt: start it afresh under the same name
        import shutil

        shutil.rmtree(run)
    common.log(f"training a head for {name} on {data}")
    return Path(hs.train(cfg, say=common.log).run_dir)


def contenders(run: Path, export: Path, body: bool,
               calibration: list[np.ndarray]) -> dict[str, Callable[[np.ndarray], Any]]:
    """torch eager, TorchScript, ORT fp32 and ORT int8 functions of the run's model (or of its body alone)."""
    from headstart.deploy import convert
    from headstart.deploy.quantize import quantize_static
    from headstart.deploy.runtime import onnx_runner, torchscript_runner
    from headstart.models import load_network

    net, _ = load_network(run / "best.pt")
    net.eval()
    if body:  # the frozen body alone: what the feature cache runs
        fp32 = convert.to_onnx(net, body_only=True)[0]
        return {"torch": _eager(net.features),
                "torchscript": torchscript_runner(convert.to_torchscript(net, body_only=True), "cpu"),
                "ort_fp32": onnx_runner(fp32), "ort_int8": onnx_runner(quantize_static(fp32, calibration))}
    return {"torch": _eager(net), "torchscript": torchscript_runner(convert.to_torchscript(net), "cpu"),
            "ort_fp32": onnx_runner(convert.to_onnx(net)[0]),
            "ort_int8": onnx_runner((export / "model.int8.onnx").read_bytes())}


def images(run: Path, folder: Path, count: int) -> np.ndarray:
    """``count`` photos from ``folder``, through the model's own eval transform."""
    from headstart.data import list_images, load_image
    from headstart.deploy.runtime import open_predictor

    p = open_predictor(run)
    paths = list_images(folder)
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]
    return np.stack([p.preprocess(load_image(f)) for f in paths])


def _eager(fn: Callable[[Any], Any]) -> Callable[[np.ndarray], Any]:
    import torch

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return fn(torch.from_numpy(x))

    return run


def time_round_robin(fns: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, rounds: int,
                     calls: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``rounds`` times, the order rotating each round."""
    names = list(fns)
    for n in names:  # warm-up: allocation, kernel choice, TorchScript's profiling runs
        for _ in range(3):
            fns[n](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            for _ in range(calls):
                fns[n](x)
            times[n].append((time.perf_counter() - t) / calls)
    return times


def speed_line(model: str, part: str, batch: int, times: dict[str, list[float]]) -> dict[str, Any]:
    base = times["torch"]
    return {
        "benchmark": "infer", "model": model, "part": part, "batch": batch, "px": 224, "rounds": len(base),
        "images_per_s": {n: round(batch / statistics.median(t), 1) for n, t in times.items()},
        "ratio_vs_torch_eager": {n: round(statistics.median(b / s for b, s in zip(base, t)), 2)
                                 for n, t in times.items()},
    }


def accuracy_line(model: str, export: Path) -> dict[str, Any]:
    import json

    meta = json.loads((export / "config.json").read_text())
    q = meta["int8"]
    return {"benchmark": "infer", "model": model, "part": "int8_accuracy", "data": "clothing-small validation",
            "fp32_top1": meta["evaluation"]["top1"], "int8_top1": meta["evaluation"]["export_top1"],
            "chosen": q["method"], "candidates": q["candidates"],
            "top1_change_points": round(100 * (meta["evaluation"]["export_top1"] - meta["evaluation"]["top1"]), 2)}


def extraction_line(name: str, run: Path, data: Path, args: Any) -> dict[str, Any]:
    """End to end feature extraction (decode, resize, body, write) as the cache does it: torch vs fast_body."""
    import tempfile

    import torch

    from headstart.data import build_transform, folder_dataset
    from headstart.deploy.features import fast_body
    from headstart.models import load_network
    from headstart.training.cache import extract

    net, _ = load_network(run / "best.pt")
    ds = folder_dataset(data / "train")
    ds = ds.subset(np.linspace(0, len(ds) - 1, args.extract_images).round().astype(int).tolist())
    ds.transform = build_transform(net.preprocessing, train=False, augment=False)
    times: dict[str, list[float]] = {"torch": [], "fast_body": []}
    engine = ""
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.extract_rounds):
            for n in (["torch", "fast_body"] if r % 2 == 0 else ["fast_body", "torch"]):
                runner = fast_body(net) if n == "fast_body" else None
                t = time.perf_counter()
                extract(net, ds, Path(tmp) / f"{n}.npy", batch_size=64, device=torch.device("cpu"), view_seed=None,
                        progress=False, desc=n, run=runner)
                times[n].append(time.perf_counter() - t)
                engine = runner.engine if runner is not None else engine
        a, b = np.load(Path(tmp) / "torch.npy"), np.load(Path(tmp) / "fast_body.npy")
    return {"benchmark": "infer", "model": name, "part": "feature_extraction_end_to_end", "images": len(ds),
            "engine_chosen": engine, "max_abs_feature_diff": float(np.abs(a - b).max()),
            "seconds_median": {n: round(statistics.median(t), 2) for n, t in times.items()},
            "speedup": round(statistics.median(x / y for x, y in zip(times["torch"], times["fast_body"])), 2)}


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: both)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--body", action="store_true", help="also time the frozen body alone (feature extraction)")
    p.add_argument("--limit-train", type=int, default=1000, help="training images for the head (default 1000)")
    p.add_argument("--extract-images", type=int, default=512, help="images for the end-to-end extraction timing")
    p.add_argument("--extract-rounds", type=int, default=2)
    p.add_argument("--retrain", action="store_true", help="train the heads again even if the runs exist")
    args = p.parse_args()
    if args.quick:
        args.models, args.rounds = "mobilenet_v2", 3
    common.setup_torch(args.threads)
    from headstart.deploy.export import export_model

    data = clothing(args)
    common.emit({"benchmark": "infer", "machine": common.machine_info()})
    for name in args.models.split(","):
        run = train_run(name, MODELS[name], data, args)
        export = export_model(run, "onnx", int8=True, say=common.log)
        common.emit(accuracy_line(name, export))
        x_all = images(run, data / "validation", 32)
        calibration = [images(run, data / "train", 64)[i : i + 16] for i in range(0, 64, 16)] if args.body else []
        for part in ("model", "body") if args.body else ("model",):
            fns = contenders(run, export, part == "body", calibration)
            for batch in (int(b) for b in args.batches.split(",")):
                calls = 16 if batch == 1 else 1
                common.log(f"{name} {part} batch {batch}: {args.rounds} rounds x {calls} call(s)")
                common.emit(speed_line(name, part, batch, time_round_robin(fns, x_all[:batch], args.rounds, calls)))
        if args.body:
            common.emit(extraction_line(name, run, data, args))


if __name__ == "__main__":
    main()
