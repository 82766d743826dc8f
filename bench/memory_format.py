"""Benchmark 12 (issue 12): channels-last against the default memory format, for training and inference on the CPU.

For each backbone: two copies of the network (random weights: speed does not depend on them),
BatchNorm in eval mode as headstart fine-tunes (``finetune_bn: eval-all``), one in the default
(NCHW) memory format and one in channels-last (NHWC), each fed inputs in its own format. After a
warm-up, rounds alternate (A B A B ...): ``--steps`` AdamW training steps of ``--batch-size``
random images, then as many inference batches. One JSON line per backbone: the median images/s of
each, and the ratio channels-last / default (the median of the per-round ratios).

    python bench/memory_format.py --models mobilenet_v2:224,tf_efficientnet_lite1:128,resnet50:224
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "memory_format"


def build(name: str, channels_last: bool) -> Any:
    import torch
    from torch import nn

    from headstart.models.backbones import build_network

    net = build_network(name, weights="none", num_classes=10)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def timed(net: Any, opt: Any, x: Any, y: Any, train: bool) -> float:
    """Images per second of one training step (or one inference batch)."""
    import torch

    start = time.perf_counter()
    if train:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        net.eval()
        with torch.inference_mode():
            net(x)
        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return len(x) / (time.perf_counter() - start)


def measure(name: str, size: int, args: Any) -> dict[str, Any]:
    import torch

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, 10, (args.batch_size,))
    sides = {}
    for fmt, cl in (("default", False), ("channels_last", True)):
        net = build(name, cl)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        for _ in range(2):  # warm-up: allocations, oneDNN primitive caches
            timed(net, opt, xi, y, True)
            timed(net, opt, xi, y, False)
        sides[fmt] = (net, opt, xi)
    speeds: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in sides}
    for _ in range(args.rounds):
        for fmt, (net, opt, xi) in sides.items():
            for kind in ("train", "infer"):
                speeds[fmt][kind].append(common.median([timed(net, opt, xi, y, kind == "train")
                                                        for _ in range(args.steps)]))
    out: dict[str, Any] = {"benchmark": BENCH, "model": name, "size": size, "batch_size": args.batch_size,
                           "rounds": args.rounds, "steps": args.steps}
    out |= common.two_sides(speeds, "default", "channels_last")
    out["machine"] = common.machine_info()
    return out


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2:224,tf_efficientnet_lite1:128,tf_efficientnet_lite0:224,"
                                       "resnet18:224,resnet50:224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--results", type=Path, default=common.REPO / "bench" / "results" / "memory_format.jsonl")
    common.per_model(p.parse_args(), measure)


if __name__ == "__main__":
    main()
