"""Benchmark (issue 11): which ONNX Runtime static-int8 options keep EfficientNet-Lite0's top-1.

The model is ``bench/infer.py``'s: ``timm:tf_efficientnet_lite0`` (``--weights DEFAULT``) with a
10-class head trained by headstart on 1,000 clothing-small training images (reused when
``infer.py`` already trained it). Its fp32 ONNX graph is quantised (static, QDQ) once per
variant and each variant reports:

- top-1 on clothing-small's 341 validation photos (what ``headstart export --int8`` measures),
  and its change against fp32's, in points;
- the same on ``--holdout`` training photos the head never saw (the 2,068 the run left out, evenly
  spread): a second, larger check, so that a choice is not fitted to 341 images (1 point = 3.4);
- agreement of the int8 answers with fp32's on both, and the speed-up over fp32 at batch 32.

Variants (``--variants`` picks some, comma-separated): calibration images, MinMax / entropy /
percentile calibration (histograms collected 32 images at a time to bound memory), per-tensor
weights, reduce_range, symmetric activations (int8), and nodes kept in fp32 (depthwise convs,
the last blocks, the stem and the classifier).

    flock /tmp/headstart-cpu.lock python bench/int8_options.py                 # every variant
    flock /tmp/headstart-cpu.lock python bench/int8_options.py --variants base,entropy
"""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import infer  # noqa: E402

MODEL = "timm:tf_efficientnet_lite0"

# name -> (calibration images, options for quantize(...) below)
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "base": (256, {}),  # MinMax, per-channel int8 weights, uint8 activations
    "base_unstrided": (256, {"strided": False}),  # what export --int8 did: all batches in one collection
    "calib64": (64, {}),
    "calib512": (512, {}),
    "calib1000": (1000, {}),
    "per_tensor": (256, {"per_channel": False}),
    "reduce_range": (256, {"reduce_range": True}),
    "moving_average": (256, {"extra": {"CalibMovingAverage": True}}),
    "entropy": (256, {"method": "Entropy"}),
    "percentile": (256, {"method": "Percentile"}),  # 99.999th percentile of |x| (ORT's default)
    "percentile_9999": (256, {"method": "Percentile", "extra": {"CalibPercentile": 99.99}}),
    "percentile512": (512, {"method": "Percentile"}),
    "percentile_rr": (256, {"method": "Percentile", "reduce_range": True}),
    "percentile_999": (256, {"method": "Percentile", "extra": {"CalibPercentile": 99.9}}),
    "percentile_9999_rr": (256, {"method": "Percentile", "reduce_range": True, "extra": {"CalibPercentile": 99.99}}),
    "percentile_9999_1000": (1000, {"method": "Percentile", "extra": {"CalibPercentile": 99.99}}),
    # only convolutions and the classifier: residual adds, pooling and the rest stay fp32
    "percentile_9999_convs": (256, {"method": "Percentile", "ops": ["Conv", "Gemm"],
                                    "extra": {"CalibPercentile": 99.99}}),
    "convs_only": (256, {"ops": ["Conv", "Gemm"]}),
    "symmetric_s8": (256, {"activation": "QInt8", "extra": {"ActivationSymmetric": True}}),
    "no_depthwise": (256, {"exclude": "depthwise"}),
    "no_last_block": (256, {"exclude": "last"}),
    "no_stem_head": (256, {"exclude": "stem_head"}),
    "no_first_blocks": (256, {"exclude": "first"}),
}


def quantize(fp32: bytes, calibration: list[np.ndarray], *, method: str = "MinMax", per_channel: bool = True,
             reduce_range: bool = False, activation: str = "QUInt8", exclude: str = "",
             extra: dict[str, Any] | None = None, strided: bool = True,
             ops: list[str] | None = None) -> tuple[bytes, int]:
    """Static QDQ int8 bytes and how many nodes were kept in fp32."""
    from onnxruntime import quantization as q

    from headstart.deploy.quantize import preprocessed

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(preprocessed(fp32, Path(tmp)))
        excluded = excluded_nodes(src, exclude)
        # Ranges collected one batch of 32 at a time and merged: histograms of every activation of
        # all 256 images at once ran out of memory. (ORT 1.32's CalibMaxIntermediateOutputs drops
        # the batches it clears instead of merging them: not used.)
        options = ({"CalibStridedMinMax": 1} if strided else {}) | (extra or {})
        q.quantize_static(str(src), str(dst), Reader(calibration), quant_format=q.QuantFormat.QDQ,
                          per_channel=per_channel, reduce_range=reduce_range,
                          activation_type=getattr(q.QuantType, activation), weight_type=q.QuantType.QInt8,
                          calibrate_method=getattr(q.CalibrationMethod, method), nodes_to_exclude=excluded,
                          op_types_to_quantize=ops,
                          extra_options=options)
        return dst.read_bytes(), len(excluded)


class Reader:
    """ORT's CalibrationDataReader over batches, with the ``len``/``set_range`` that striding needs."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches, self.start, self.end = batches, 0, len(batches)
        self.at = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= self.end:
            return None
        self.at += 1
        return {"input": self.batches[self.at - 1]}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.at, self.end = start_index, end_index

    def rewind(self) -> None:
        self.at, self.end = 0, len(self.batches)


def excluded_nodes(path: Path, which: str) -> list[str]:
    """Names of the nodes kept in fp32 for ``which`` (depthwise, last, first, stem_head, or "")."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    if which == "depthwise":
        return [n.name for n in nodes if n.op_type == "Conv"
                and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if which == "last":  # the last block (blocks.6) and the 1x1 head conv
        return [n.name for n in nodes if "blocks.6" in n.name or "conv_head" in n.name]
    if which == "first":  # the stem and the first two blocks, where activations are largest
        return [n.name for n in nodes if any(k in n.name for k in ("conv_stem", "blocks.0", "blocks.1"))]
    if which == "stem_head":
        convs = [n.name for n in nodes if n.op_type == "Conv"]
        return [convs[0]] + [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return []


def holdout(run: Path, data: Path, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` training photos the run did not train on, prepared, with model class indices."""
    from headstart.data import folder_dataset
    from headstart.deploy.runtime import eval_transform
    from headstart.models import read_checkpoint

    ckpt = read_checkpoint(run / "best.pt")
    used = set(_run_train_paths(ckpt))
    ds = folder_dataset(data / "train")
    idx = [i for i, p in enumerate(ds.paths) if str(p) not in used]
    idx = [idx[i] for i in np.linspace(0, len(idx) - 1, min(count, len(idx))).round().astype(int)]
    tf = eval_transform(ckpt)
    classes = list(ckpt["classes"])
    from headstart.data import load_image

    x = np.stack([tf(load_image(ds.paths[i])).numpy() for i in idx]).astype(np.float32)
    y = np.array([classes.index(ds.classes[ds.targets[i]]) for i in idx])
    return [x[i : i + 32] for i in range(0, len(x), 32)], y


def _run_train_paths(ckpt: dict[str, Any]) -> list[str]:
    from headstart.config import RunConfig, from_dict
    from headstart.data import build_data
    from headstart.models import Preprocessing

    cfg = from_dict(RunConfig, ckpt["config"])
    cfg.data.augment, cfg.data.in_memory, cfg.data.workers = False, False, 0
    bundle = build_data(cfg.data, Preprocessing.from_dict(ckpt["preprocessing"]), seed=cfg.train.seed)
    return [str(p) for p in bundle.train.paths]


def top1(logits: list[np.ndarray], y: np.ndarray) -> float:
    return float((np.concatenate([b.argmax(1) for b in logits]) == y).mean())


def agree(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float((np.concatenate([x.argmax(1) for x in a]) == np.concatenate([x.argmax(1) for x in b])).mean())


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, choices=list(infer.MODELS), help="default %(default)s")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--holdout", type=int, default=1000, help="unseen training photos for the second check")
    p.add_argument("--limit-train", type=int, default=1000)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    common.setup_torch(args.threads)
    from headstart.deploy import convert
    from headstart.deploy.quantize import speedup
    from headstart.deploy.runtime import onnx_runner
    from headstart.deploy.samples import check_samples, training_samples
    from headstart.models import load_network, read_checkpoint

    data = infer.clothing(args)
    run = infer.train_run(args.model, infer.MODELS[args.model], data, args)
    ckpt = read_checkpoint(run / "best.pt")
    net, _ = load_network(ckpt)
    fp32 = convert.to_onnx(net.eval())[0]
    val = check_samples(ckpt, None, limit=1000)
    hold_x, hold_y = holdout(run, data, args.holdout)
    run32 = onnx_runner(fp32, threads=args.threads)
    ref_val, ref_hold = [run32(b) for b in val.batches], [run32(b) for b in hold_x]
    base = {"val": top1(ref_val, val.targets), "holdout": top1(ref_hold, hold_y)}
    common.emit({"benchmark": "int8_options", "model": args.model, "fp32_top1": base, "val_images": val.count,
                 "holdout_images": len(hold_y), "machine": common.machine_info()})
    pools: dict[int, list[np.ndarray]] = {}
    timing = np.concatenate(val.batches)[:32]
    for name in args.variants.split(","):
        n, options = VARIANTS[name]
        if n not in pools:
            pools[n] = training_samples(ckpt, limit=n).batches
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # ORT prints its progress on stdout
            data8, kept = quantize(fp32, pools[n], **options)
        seconds = time.perf_counter() - start
        run8 = onnx_runner(data8, threads=args.threads)
        out_val, out_hold = [run8(b) for b in val.batches], [run8(b) for b in hold_x]
        line = {"benchmark": "int8_options", "model": args.model, "variant": name,
                "calibration_images": sum(len(b) for b in pools[n]),
                "options": options, "fp32_nodes_kept": kept, "quantise_seconds": round(seconds, 1),
                "val_top1": round(top1(out_val, val.targets), 4),
                "val_change_points": round(100 * (top1(out_val, val.targets) - base["val"]), 2),
                "holdout_change_points": round(100 * (top1(out_hold, hold_y) - base["holdout"]), 2),
                "val_agreement": round(agree(out_val, ref_val), 4),
                "holdout_agreement": round(agree(out_hold, ref_hold), 4),
                "speedup_vs_fp32_b32": round(speedup(run32, run8, timing), 2),
                "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}
        common.log(f"{name}: val {line['val_change_points']:+.2f} points, holdout "
                   f"{line['holdout_change_points']:+.2f}, {line['speedup_vs_fp32_b32']}x")
        common.emit(line)


if __name__ == "__main__":
    main()
