"""Benchmark 6 (issue 3): fine-tuning the last depth groups from the cached frozen prefix.

EfficientNet-Lite0 (real ImageNet weights) at 128 px on the 5,000/1,000 CIFAR-10 subset: one
fine-tuning stage that trains the last ``--unfreeze`` depth groups and the head (the first ones
frozen, BatchNorm in eval mode, headstart's fine-tuning learning rate and layer decay), for
``--epochs`` epochs without augmentation, run twice through ``headstart.training.fit.fit``:

* ``prefix``: headstart's default: the frozen first part of the body runs once over the images
  (``cache.prefix=true``, a fresh cache folder, so that extraction is inside its time) and each
  epoch runs only the rest;
* ``full``: ``cache.prefix=false``: every epoch runs every image through the whole network.

Same seed, order and initial weights, so the accuracies should agree to within rounding. Reports
each contender's seconds (median over rounds, extraction included), the speedup full / prefix
and the final validation accuracies.

    python bench/prefix_cache.py [--unfreeze 3] [--epochs 3] [--rounds 1] [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "prefix_cache"


def run(args: Any, subset: Path, prefix: bool, cache_dir: Path) -> dict[str, Any]:
    from headstart.config import RunConfig, StageConfig
    from headstart.jobs.train import prepare
    from headstart.models.freeze import unfreeze_last
    from headstart.training.fit import fit

    cfg = RunConfig()
    cfg.model.name, cfg.model.weights, cfg.model.input_size = "tf_efficientnet_lite0", "DEFAULT", args.size
    cfg.data.source, cfg.data.augment = str(subset), False
    cfg.train.progress, cfg.train.device, cfg.train.seed = False, "cpu", args.seed
    cfg.cache.dir, cfg.cache.prefix = str(cache_dir), prefix
    cfg.report = cfg.tensorboard = False
    net, data = prepare(cfg)
    d = RunConfig().train
    cfg.train.stages = [StageConfig(name="finetune", epochs=args.epochs, freeze=unfreeze_last(net, str(args.unfreeze)),
                                    lr=d.finetune_lr, layer_decay=d.layer_decay, bn=d.finetune_bn)]
    start = time.perf_counter()
    result = fit(net, data, cfg, None, say=lambda m: common.log("  " + m.strip()) if m.strip() else None)
    seconds = time.perf_counter() - start
    extraction = sum(json.loads(m.read_text())["seconds"] for m in cache_dir.glob("*/view*.json"))
    return {"seconds": seconds, "extraction_seconds": extraction, "final_val_acc": result.final.top1,
            "epoch_seconds": [h["seconds"] for h in result.history],
            "images_per_s": [h["images_per_s"] for h in result.history]}


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--unfreeze", type=int, default=3, help="last depth groups that train")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    common.setup_torch(args.threads)
    args.epochs = args.epochs or (1 if args.quick else 3)
    n_train, n_val = (50, 20) if args.quick else (500, 100)
    subset = common.subset_for(args, BENCH, n_train, n_val)
    runs: dict[str, list[dict[str, Any]]] = {"prefix": [], "full": []}
    for r, order in enumerate(common.alternate(args.rounds, list(runs))):
        for name in order:
            cache_dir = common.fresh_dir(Path(args.work_dir) / f"prefix-cache-{os.getpid()}-{r}-{name}")
            common.log(f"round {r + 1}/{args.rounds}: {name}")
            out = run(args, subset, name == "prefix", cache_dir)
            common.log(f"{name}: {out['seconds']:.1f}s, final val acc {out['final_val_acc']:.4f}")
            runs[name].append(out)
    med = {k: common.median([o["seconds"] for o in v]) for k, v in runs.items()}
    acc = {k: common.median([o["final_val_acc"] for o in v]) for k, v in runs.items()}
    common.emit(common.round_floats({
        "benchmark": BENCH, "quick": args.quick, "input_size": args.size, "epochs": args.epochs,
        "unfreeze_last_groups": args.unfreeze, "train_images": n_train * 10, "val_images": n_val * 10,
        "seconds": med, "speedup": common.ratio(med["full"], med["prefix"]),
        "final_val_acc": acc, "acc_diff_points": 100 * (acc["prefix"] - acc["full"]),
        "prefix_extraction_seconds": common.median([o["extraction_seconds"] for o in runs["prefix"]]),
        "epoch_seconds": {k: v[-1]["epoch_seconds"] for k, v in runs.items()},
        "machine": common.machine_info(),
    }))


if __name__ == "__main__":
    main()
