"""Benchmark 1 (issue 3): head-only training with headstart's feature cache vs the seed's plain loop.

Both contenders train only a new final layer on a frozen EfficientNet-Lite0 (real ImageNet
weights) at 128 px, on a class-balanced CIFAR-10 subset (5,000 train / 1,000 val JPEGs), for 10
epochs, validating after every epoch:

* ``headstart``: ``headstart.jobs.train.prepare`` + ``headstart.training.fit.fit`` with ``cache.enabled=True``
  and a fresh, empty cache folder, so extracting the features is part of its time;
* ``hand``: the seed's plain PyTorch loop: ImageFolder + DataLoader, the frozen body run forward
  every epoch (eval mode, ``torch.no_grad()``), the head trained.

They share the initial head weights (copied from the same prepared network), the optimizer (AdamW,
lr 1e-3, weight decay 0.01 on the weight, none on the bias, as headstart's parameter groups), the
schedule (``headstart.training.optim.lr_factor``: 10% linear warmup then cosine, stepped per batch), the
seed and the per-epoch sample order (headstart's ``RandomSampler`` seeded ``seed*100003+epoch``),
batch 64 with ``drop_last``, and no augmentation (so the features are the same, and the final
accuracies should agree to within rounding).

Result: one JSON line with each contender's seconds (median over rounds), the speedup
``hand / headstart`` (target >= 8x) and the final validation accuracies and their difference
(target within 0.5 points).

    python bench/cache_speedup.py            # full: 500+100 per class, 10 epochs, 1 round (A then B)
    python bench/cache_speedup.py --quick    # 50+20 per class, 2 epochs
"""

from __future__ import annotations

import copy
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "cache_speedup"


def child_cpu() -> float:
    """CPU seconds of this process plus its reaped children (DataLoader workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def headstart_cfg(args: Any, subset: Path, cache_dir: Path) -> Any:
    from headstart.config import RunConfig

    cfg = RunConfig()
    cfg.model.name, cfg.model.weights, cfg.model.input_size = args.model, "DEFAULT", args.size
    cfg.data.source = str(subset)
    cfg.data.batch_size = args.batch_size
    cfg.data.augment = False  # the cached view 0 is unaugmented anyway; keep both sides identical
    cfg.train.epochs, cfg.train.finetune_epochs = args.epochs, 0
    cfg.train.seed = args.seed
    cfg.train.progress = False
    cfg.train.device = "cpu"
    cfg.cache.enabled, cfg.cache.dir = True, str(cache_dir)
    cfg.report = cfg.tensorboard = False
    return cfg


def run_headstart(net: Any, data: Any, cfg: Any) -> dict[str, Any]:
    from headstart.training.fit import fit

    cpu0, start = child_cpu(), time.perf_counter()
    result = fit(net, data, cfg, None, say=lambda m: common.log("  hs: " + m.strip()) if m.strip() else None)
    seconds = time.perf_counter() - start
    hist = result.history
    return {
        "seconds": seconds,
        "cpu_seconds": child_cpu() - cpu0,
        "final_val_acc": result.final.top1,
        "val_acc_per_epoch": [h["val_acc"] for h in hist],
        "train_epoch_seconds": [h["seconds"] for h in hist],
        "extraction_seconds": _extraction_seconds(Path(cfg.cache.dir)),
    }


def _extraction_seconds(root: Path) -> float:
    import json

    return float(sum(json.loads(m.read_text())["seconds"] for m in root.glob("*/view*.json")))


def run_hand(body: Any, head: Any, subset: Path, pre: Any, args: Any) -> dict[str, Any]:
    """The seed's loop: the frozen body runs forward on every image, every epoch."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets
    from torchvision.transforms import v2

    from headstart.training.optim import lr_factor

    interp = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}[pre.interpolation]
    tf = v2.Compose([
        v2.ToImage(),
        v2.Resize(pre.resize, interpolation=interp, antialias=True),
        v2.CenterCrop(pre.crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
        v2.ToPureTensor(),
    ])
    cpu0, start = child_cpu(), time.perf_counter()
    train_set = datasets.ImageFolder(str(subset / "train"), transform=tf)
    val_set = datasets.ImageFolder(str(subset / "val"), transform=tf)
    workers = args.hand_workers
    val_loader = DataLoader(val_set, batch_size=args.batch_size * 2, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0)
    body.eval()
    for p in body.parameters():
        p.requires_grad_(False)
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    steps_per_epoch = len(train_set) // args.batch_size if len(train_set) > args.batch_size else 1
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, 0.1, "cosine"))
    loss_fn = nn.CrossEntropyLoss()
    accs, epoch_secs = [], []
    for epoch in range(args.epochs):
        e0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # headstart's epoch order
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=RandomSampler(train_set, generator=gen),
                            num_workers=workers, drop_last=len(train_set) > args.batch_size)
        head.train()
        for x, y in loader:
            with torch.no_grad():
                f = body(x)
            loss = loss_fn(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((head(body(x)).argmax(1) == y).sum())
                n += len(y)
        accs.append(correct / n)
        epoch_secs.append(time.perf_counter() - e0)
        common.log(f"  hand: epoch {epoch + 1}/{args.epochs} val acc {accs[-1]:.4f} ({epoch_secs[-1]:.1f}s)")
    del val_loader
    return {"seconds": time.perf_counter() - start, "cpu_seconds": child_cpu() - cpu0, "final_val_acc": accs[-1],
            "val_acc_per_epoch": accs, "epoch_seconds": epoch_secs}


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, help="headstart's default")
    p.add_argument("--lr", type=float, default=1e-3, help="headstart's default head lr")
    p.add_argument("--rounds", type=int, default=1, help="A B rounds (A B A B ...); medians are reported")
    p.add_argument("--per-class", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="images per class (default 500 100; 50 20 with --quick)")
    p.add_argument("--hand-workers", type=int, default=None,
                   help="DataLoader workers of the hand loop (default: what headstart picks for files)")
    args = p.parse_args()
    common.setup_torch(args.threads)
    args.epochs = args.epochs or (2 if args.quick else 10)
    n_train, n_val = args.per_class or ((50, 20) if args.quick else (500, 100))
    subset = common.subset_for(args, BENCH, n_train, n_val)

    from headstart.data.loaders import usable_cpus
    from headstart.jobs.train import prepare

    if args.hand_workers is None:
        args.hand_workers = max(0, min(4, usable_cpus() - 1))  # headstart's default_workers for files

    runs: dict[str, list[dict[str, Any]]] = {"headstart": [], "hand": []}
    prepare_secs = []
    for r, order in enumerate(common.alternate(args.rounds, ["headstart", "hand"])):
        cache_dir = common.fresh_dir(Path(args.work_dir) / f"cache-speedup-{os.getpid()}-{r}")
        cfg = headstart_cfg(args, subset, cache_dir)
        t0 = time.perf_counter()
        net, data = prepare(cfg)  # builds the network (seeded head) and scans the folder
        prepare_secs.append(time.perf_counter() - t0)
        body, head = copy.deepcopy(net.body), copy.deepcopy(net.head)  # same start for the hand loop
        for name in order:
            common.log(f"round {r + 1}/{args.rounds}: {name}")
            probe = common.tiny_op_ms(20)
            if name == "headstart":
                out = run_headstart(net, data, cfg)
            else:
                out = run_hand(body, head, subset, net.preprocessing, args)
            out["probe_ms"] = max(probe, common.tiny_op_ms(20))
            common.log(f"round {r + 1}: {name} {out['seconds']:.1f}s, final val acc {out['final_val_acc']:.4f} "
                       f"(contention probe {out['probe_ms']:.1f} ms)")
            runs[name].append(out)
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)

    hs_s = common.median([o["seconds"] for o in runs["headstart"]])
    hand_s = common.median([o["seconds"] for o in runs["hand"]])
    prep_s = common.median(prepare_secs)
    hs_acc = common.median([o["final_val_acc"] for o in runs["headstart"]])
    hand_acc = common.median([o["final_val_acc"] for o in runs["hand"]])
    per_round = [common.ratio(b["seconds"], a["seconds"]) for a, b in zip(runs["headstart"], runs["hand"])]
    speedup = common.ratio(hand_s, hs_s)
    diff_points = 100 * (hs_acc - hand_acc)
    common.emit(common.round_floats({
        "benchmark": BENCH,
        "quick": args.quick,
        "model": args.model,
        "input_size": args.size,
        "train_images": n_train * 10,
        "val_images": n_val * 10,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "headstart_seconds": hs_s,
        "hand_seconds": hand_s,
        "speedup": speedup,
        "speedup_per_round": per_round,
        "speedup_incl_headstart_prepare": common.ratio(hand_s, hs_s + prep_s),
        "headstart_prepare_seconds": prep_s,
        "headstart_extraction_seconds": common.median([o["extraction_seconds"] for o in runs["headstart"]]),
        "headstart_cpu_seconds": common.median([o["cpu_seconds"] for o in runs["headstart"]]),
        "hand_cpu_seconds": common.median([o["cpu_seconds"] for o in runs["hand"]]),
        "headstart_final_val_acc": hs_acc,
        "hand_final_val_acc": hand_acc,
        "acc_diff_points": diff_points,
        "target_speedup": 8.0,
        "speedup_met": speedup >= 8.0,
        "target_acc_diff_points": 0.5,
        "acc_diff_met": abs(diff_points) <= 0.5 + 1e-9,
        "headstart_val_acc_per_epoch": runs["headstart"][-1]["val_acc_per_epoch"],
        "hand_val_acc_per_epoch": runs["hand"][-1]["val_acc_per_epoch"],
        "hand_epoch_seconds": runs["hand"][-1]["epoch_seconds"],
        # 10 x the median hand epoch: less sensitive to a burst of contention than the sum.
        "hand_seconds_from_median_epoch": args.epochs * common.median(runs["hand"][-1]["epoch_seconds"]),
        "contention_probe_ms": {k: [o["probe_ms"] for o in v] for k, v in runs.items()},
        "hand_workers": args.hand_workers,
        "machine": common.machine_info(),
    }))
    if not math.isfinite(speedup):
        sys.exit(1)


if __name__ == "__main__":
    main()
