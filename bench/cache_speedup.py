"""Benchmark 1 (issue 3): head-only training with headstart's feature cache vs the seed's plain loop.

Both contenders train only a new final layer on a frozen EfficientNet-Lite0 (real ImageNet
weights) at 128 px, on a class-balanced CIFAR-10 subset (5,000 train / 1,000 val JPEGs), for 10
epochs, validating after every epoch:

* ``headstart``: ``headstart.jobs.train.prepare`` + ``headstart.training.fit.fit`` with ``cache.enabled=True``
  and a fresh, empty cache folder, so extracting the features is part of its time;
* ``hand``: the seed's plain PyTorch loop: ImageFolder + DataLoader, the frozen body run forward
  every epoch (eval mode, ``torch.no_grad()``), the head trained;
* ``headstart_torch`` (with ``--contenders``): ``headstart`` with ``cache.engine=torch``, the
  features extracted by PyTorch. ``headstart`` is the default ``cache.engine=auto``, which on this
  CPU extracts them with ONNX Runtime (verified against PyTorch at the first batch), so
  ``headstart_torch / headstart`` is that engine's end-to-end gain (``engine_speedup``).

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
    python bench/cache_speedup.py --contenders headstart,headstart_torch --rounds 2   # the cache engine
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


def headstart_cfg(args: Any, subset: Path, cache_dir: Path, engine: str = "auto") -> Any:
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
    cfg.cache.enabled, cfg.cache.dir, cfg.cache.engine = True, str(cache_dir), engine
    cfg.report = cfg.tensorboard = False
    return cfg


def run_headstart(net: Any, data: Any, cfg: Any) -> dict[str, Any]:
    from headstart.jobs.train import fit  # training.fit.fit with cfg.cache.engine's body engine

    lines: list[str] = []

    def say(m: str) -> None:
        lines.append(m.strip())
        if m.strip():
            common.log("  hs: " + m.strip())

    cpu0, start = child_cpu(), time.perf_counter()
    result = fit(net, data, cfg, None, say=say)
    seconds = time.perf_counter() - start
    hist = result.history
    return {
        "seconds": seconds,
        "engine_note": next((x for x in lines if x.startswith("features extracted by")), "PyTorch (no note)"),
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


def medians(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, float]:
    return {name: common.median([o[key] for o in rs]) for name, rs in runs.items() if rs and key in rs[0]}


def summary(args: Any, runs: dict[str, list[dict[str, Any]]], n_train: int, n_val: int,
            prep_s: float) -> dict[str, Any]:
    """The result line: each contender's medians, and the ratios of the pairs that ran."""
    secs, accs = medians(runs, "seconds"), medians(runs, "final_val_acc")
    out: dict[str, Any] = {
        "benchmark": BENCH, "quick": args.quick, "model": args.model, "input_size": args.size,
        "train_images": n_train * 10, "val_images": n_val * 10, "epochs": args.epochs,
        "batch_size": args.batch_size, "rounds": args.rounds, "contenders": list(runs),
        "headstart_prepare_seconds": prep_s,
    }
    for name in runs:
        out[f"{name}_seconds"], out[f"{name}_final_val_acc"] = secs[name], accs[name]
        out[f"{name}_cpu_seconds"] = medians(runs, "cpu_seconds")[name]
        out[f"{name}_val_acc_per_epoch"] = runs[name][-1]["val_acc_per_epoch"]
        if name != "hand":
            out[f"{name}_extraction_seconds"] = medians(runs, "extraction_seconds")[name]
            out[f"{name}_engine"] = runs[name][-1]["engine_note"]
    if "hand" in runs and "headstart" in runs:
        speedup, diff = common.ratio(secs["hand"], secs["headstart"]), 100 * (accs["headstart"] - accs["hand"])
        out |= {
            "speedup": speedup,
            "speedup_per_round": [common.ratio(b["seconds"], a["seconds"])
                                  for a, b in zip(runs["headstart"], runs["hand"])],
            "speedup_incl_headstart_prepare": common.ratio(secs["hand"], secs["headstart"] + prep_s),
            "acc_diff_points": diff, "target_speedup": 8.0, "speedup_met": speedup >= 8.0,
            "target_acc_diff_points": 0.5, "acc_diff_met": abs(diff) <= 0.5 + 1e-9,
            "hand_epoch_seconds": runs["hand"][-1]["epoch_seconds"],
            # 10 x the median hand epoch: less sensitive to a burst of contention than the sum.
            "hand_seconds_from_median_epoch": args.epochs * common.median(runs["hand"][-1]["epoch_seconds"]),
            "hand_workers": args.hand_workers,
        }
    if "headstart_torch" in runs and "headstart" in runs:
        ext = medians(runs, "extraction_seconds")
        out |= {
            "engine_speedup": common.ratio(secs["headstart_torch"], secs["headstart"]),
            "engine_speedup_per_round": [common.ratio(b["seconds"], a["seconds"])
                                         for a, b in zip(runs["headstart"], runs["headstart_torch"])],
            "engine_extraction_speedup": common.ratio(ext["headstart_torch"], ext["headstart"]),
            "engine_acc_diff_points": 100 * (accs["headstart"] - accs["headstart_torch"]),
        }
    out["contention_probe_ms"] = {k: [o["probe_ms"] for o in v] for k, v in runs.items()}
    out["machine"] = common.machine_info()
    return out


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, help="headstart's default")
    p.add_argument("--lr", type=float, default=1e-3, help="headstart's default head lr")
    p.add_argument("--rounds", type=int, default=1, help="rounds, the order rotating (A B, B A, ...); medians reported")
    p.add_argument("--per-class", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="images per class (default 500 100; 50 20 with --quick)")
    p.add_argument("--contenders", default="headstart,hand",
                   help="comma-separated: headstart (cache.engine auto), headstart_torch, hand")
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

    contenders = args.contenders.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    prepare_secs = []
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]  # A B, then B A, ...
        cache_dir = common.fresh_dir(Path(args.work_dir) / f"cache-speedup-{os.getpid()}-{r}")
        cfg = headstart_cfg(args, subset, cache_dir)
        t0 = time.perf_counter()
        net, data = prepare(cfg)  # builds the network (seeded head) and scans the folder
        prepare_secs.append(time.perf_counter() - t0)
        body, head = copy.deepcopy(net.body), copy.deepcopy(net.head)  # same start for the hand loop
        for name in order:
            common.log(f"round {r + 1}/{args.rounds}: {name}")
            probe = common.tiny_op_ms(20)
            if name == "hand":
                out = run_hand(body, head, subset, net.preprocessing, args)
            else:  # every headstart contender: the same untrained network, its own empty cache folder
                engine = "torch" if name == "headstart_torch" else "auto"
                mine = headstart_cfg(args, subset, common.fresh_dir(cache_dir / name), engine)
                out = run_headstart(copy.deepcopy(net), data, mine)
            out["probe_ms"] = max(probe, common.tiny_op_ms(20))
            common.log(f"round {r + 1}: {name} {out['seconds']:.1f}s, final val acc {out['final_val_acc']:.4f} "
                       f"(contention probe {out['probe_ms']:.1f} ms)")
            runs[name].append(out)
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    result = summary(args, runs, n_train, n_val, common.median(prepare_secs))
    common.emit(common.round_floats(result))
    if not math.isfinite(result.get("speedup", result.get("engine_speedup", 1.0))):
        sys.exit(1)


if __name__ == "__main__":
    main()
