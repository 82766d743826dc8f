"""Benchmark 5 (issue 3): how fast the training loader delivers batches, three ways.

The 5,000-image CIFAR-10 subset (JPEG files), EfficientNet-Lite0's preprocessing at 128 px,
batch 64, training augmentation (random resized crop + flip), one full pass each, alternating:

* ``files``: headstart's loader over the files (``data.in_memory=false``): decode, resize and
  augment each image every epoch, in the worker processes headstart picks for files;
* ``memory``: the images decoded once into a uint8 tensor (``data.in_memory``, the default when
  they fit), the same per-image transform applied in the main process;
* ``batched``: the same in-memory images, cropped, flipped and normalised a batch at a time
  (``data.batch_transforms``; on CUDA by default) on the benchmark's device.

Reports images/s of each (median over rounds), the ratios against ``files`` and the one-off
decode time. No model runs: this is the data side of a training step only.

    python bench/data_pipeline.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "data_pipeline"


def one_pass(loader: Any) -> float:
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    import torch

    from headstart.config import DataConfig
    from headstart.data import build_data, make_loader
    from headstart.data.loaders import default_workers
    from headstart.data.memory import enable_batch_transforms
    from headstart.models.backbones import build_network
    from headstart.runtime.device import pick_device

    n_train, n_val = (50, 20) if args.quick else (500, 100)
    subset = common.subset_for(args, BENCH, n_train, n_val)
    device = pick_device(args.device)
    pre = build_network("tf_efficientnet_lite0", "none", input_size=args.size).preprocessing
    files = build_data(DataConfig(source=str(subset), in_memory=False), pre)
    start = time.perf_counter()
    mem = build_data(DataConfig(source=str(subset), in_memory=True), pre)
    decode_s = time.perf_counter() - start
    batched = build_data(DataConfig(source=str(subset), in_memory=True), pre)
    enable_batch_transforms(batched, device)
    loaders = {
        "files": lambda: make_loader(files.train, batch_size=64, shuffle=True, workers=None, seed=0),
        "memory": lambda: make_loader(mem.train, batch_size=64, shuffle=True, workers=None, seed=0),
        "batched": lambda: make_loader(batched.train, batch_size=64, shuffle=True, workers=None, seed=0),
    }
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for order in common.alternate(args.rounds, list(loaders)):
        for name in order:
            rates[name].append(one_pass(loaders[name]()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            common.log(f"{name}: {rates[name][-1]:.0f} img/s")
    med = {k: common.median(v) for k, v in rates.items()}
    common.emit(common.round_floats({
        "benchmark": BENCH, "quick": args.quick, "images": len(files.train), "size": args.size,
        "device": str(device), "workers_files": default_workers(files.train),
        "images_per_s": med, "rounds": rates,
        "memory_vs_files": common.ratio(med["memory"], med["files"]),
        "batched_vs_files": common.ratio(med["batched"], med["files"]),
        "decode_seconds": decode_s, "machine": common.machine_info(),
    }))


if __name__ == "__main__":
    main()
