"""Benchmark 13 (issue 12): micro-batches on the CPU, training and inference, against whole batches.

For each backbone (random weights: speed does not depend on them), in channels-last with every
BatchNorm in eval mode as headstart fine-tunes: one training step of a ``--batch-size`` batch
through ``training.loop.train_one_epoch`` (AdamW) with ``micro_batch`` = the whole batch against
headstart's auto chunks (``runtime.chunks``), and ``evaluation.inference.predict_logits`` over a
batch twice that size (the validation loader's) the same two ways. Two copies of the network, one
per side; after a warm-up, rounds alternate (A B A B ...). One JSON line per backbone: the median
images/s of each side, the chunk size used, and the ratio auto / whole (the median of the per-round
ratios). ``--chunk N`` sets the chunk instead of auto (the sweep behind the budget);
``--bf16`` compares fp32 and bf16 autocast instead, both in chunks.

    python bench/micro_batch.py --models mobilenet_v2:224,tf_efficientnet_lite1:240,tf_efficientnet_lite1:128
    for c in 32 16 8 5 4; do python bench/micro_batch.py --models mobilenet_v2:224 --chunk $c; done
    python bench/micro_batch.py --models tf_efficientnet_lite1:240,mobilenet_v2:224 --bf16
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "micro_batch"


def side(net: Any, micro_batch: int | None, precision: str = "fp32") -> dict[str, Any]:
    import torch

    from headstart.runtime.precision import resolve_precision

    net = copy.deepcopy(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return {"net": net, "opt": opt, "sched": sched, "micro_batch": micro_batch,
            "precision": resolve_precision(precision, torch.device("cpu"))}


def train_speed(s: dict[str, Any], x: Any, y: Any) -> float:
    import torch

    from headstart.training.loop import train_one_epoch

    loader = [(x, y)]
    stats = train_one_epoch(s["net"], loader, s["opt"], s["sched"], torch.nn.CrossEntropyLoss(), x.device,
                            progress=False, channels_last=True, micro_batch=s["micro_batch"],
                            precision=s["precision"])
    return stats.images_per_s


def infer_speed(s: dict[str, Any], x: Any, y: Any) -> float:
    from headstart.evaluation.inference import predict_logits

    start = time.perf_counter()
    with s["precision"].autocast():
        predict_logits(s["net"], [(x, y)], x.device, micro_batch=s["micro_batch"])
    return len(x) / (time.perf_counter() - start)


def measure(name: str, size: int, args: Any) -> dict[str, Any]:
    import torch

    from headstart.models.backbones import build_network
    from headstart.runtime.chunks import chunk_size

    torch.manual_seed(args.seed)
    net = build_network(name, weights="none", num_classes=10, input_size=size)
    net.bn_policy = "eval-all"  # fine-tuning's default: chunks then step exactly as the whole batch
    net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    xv = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)
    yv = torch.cat([y, y])
    if args.bf16:  # both in chunks (--chunk or auto): fp32 against bf16 autocast
        sides = {"fp32": side(net, args.chunk), "bf16": side(net, args.chunk, "bf16")}
    else:
        sides = {"whole": side(net, args.batch_size), "auto": side(net, args.chunk)}
    for s in sides.values():  # warm-up: allocations, oneDNN primitive caches
        train_speed(s, x, y)
        infer_speed(s, xv, yv)
    speeds: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in sides}
    for _ in range(args.rounds):
        for k, s in sides.items():
            speeds[k]["train"].append(train_speed(s, x, y))
            speeds[k]["infer"].append(infer_speed(s, xv, yv))
    out: dict[str, Any] = {"benchmark": BENCH, "model": name, "size": size, "batch_size": args.batch_size,
                           "chunk": chunk_size(x, x.device, args.chunk), "chunk_set": args.chunk is not None,
                           "rounds": args.rounds}
    out |= common.two_sides(speeds, *sides)
    out["machine"] = common.machine_info()
    return out


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2:224,tf_efficientnet_lite1:240,tf_efficientnet_lite1:128,"
                                       "tf_efficientnet_lite2:260,resnet50:224")
    p.add_argument("--batch-size", type=int, default=64, help="headstart's data.batch_size default")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--chunk", type=int, default=None, help="images per chunk instead of auto (a sweep by hand)")
    p.add_argument("--bf16", action="store_true", help="compare fp32 and bf16 autocast, both in chunks")
    p.add_argument("--results", type=Path, default=common.REPO / "bench" / "results" / "micro_batch.jsonl")
    common.per_model(p.parse_args(), measure)


if __name__ == "__main__":
    main()
