"""The torchvision transfer-learning tutorial's recipe, written for headstart's benchmarks.

What the tutorial does, with one backbone swapped in for its ResNet-18 (the weights come from
headstart's loaders, so every backbone that works offline here can run it):

* data: ``RandomResizedCrop`` to the input size and a horizontal flip for training; resize the
  shorter side to ``size * 256 / 224`` and centre-crop for validation; each backbone's own
  mean/std (the tutorial's ImageNet values are right for its ResNet, not for EfficientNet-Lite);
* batch 4, shuffled; cross-entropy; SGD, lr 0.001, momentum 0.9; ``StepLR`` of 7 epochs, gamma
  0.1; 25 epochs, each followed by a validation pass; the best epoch's weights are kept;
* ``fixed``: every pretrained parameter frozen, only the new final layer trains, while the network
  stays in train mode during training epochs (as the tutorial's loop leaves it), so BatchNorm
  statistics keep updating; the frozen body still runs on fresh random crops every epoch;
* ``finetune``: the final layer replaced and every parameter trains.

It reports the last epoch's and the best epoch's validation accuracy (the tutorial returns the
best, chosen on the validation split) and seconds. Each epoch's result is appended to
``--progress FILE`` as it ends, so a run stopped by ``--time-limit`` or killed keeps its epochs.

    python bench/tutorial_recipe.py --data FOLDER --model mobilenet_v2 --mode fixed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EPOCHS, BATCH, LR, MOMENTUM, STEP, GAMMA = 25, 4, 0.001, 0.9, 7, 0.1


def _transforms(pre: Any) -> tuple[Any, Any]:
    from torchvision import transforms as T

    norm = T.Normalize(pre.mean, pre.std)
    train = T.Compose([T.RandomResizedCrop(pre.crop), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val = T.Compose([T.Resize(round(pre.crop * 256 / 224)), T.CenterCrop(pre.crop), T.ToTensor(), norm])
    return train, val


def _loaders(data: Path, pre: Any, workers: int) -> tuple[Any, Any, list[str]]:
    import torch
    from torchvision import datasets

    train_tf, val_tf = _transforms(pre)
    val_dir = data / ("val" if (data / "val").is_dir() else "validation")
    train_ds = datasets.ImageFolder(str(data / "train"), transform=train_tf)
    val_ds = datasets.ImageFolder(str(val_dir), transform=val_tf)
    if val_ds.classes != train_ds.classes:
        raise SystemExit(f"train and validation classes differ: {train_ds.classes} / {val_ds.classes}")
    gen = torch.Generator().manual_seed(0)
    train = torch.utils.data.DataLoader(train_ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                        generator=gen, persistent_workers=workers > 0)
    val = torch.utils.data.DataLoader(val_ds, batch_size=BATCH, shuffle=False, num_workers=workers,
                                      persistent_workers=workers > 0)
    return train, val, train_ds.classes


def _final_linear(module: Any) -> Any:
    from torch import nn

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SystemExit("the network has no Linear final layer")
    return linears[-1]


def build(model: str, weights: str, size: int, classes: int, mode: str) -> Any:
    """The pretrained network with a new final layer; in ``fixed`` mode only that layer trains."""
    from headstart.models.backbones import build_network

    net = build_network(model, weights, num_classes=classes, input_size=size)
    if mode == "fixed":
        for p in net.parameters():
            p.requires_grad_(False)
        for p in _final_linear(net).parameters():
            p.requires_grad_(True)
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    return net


def _epoch(net: Any, loader: Any, opt: Any, train: bool) -> tuple[float, float]:
    import torch

    net.train(train)
    loss_fn = torch.nn.CrossEntropyLoss()
    total = correct = 0
    loss_sum = 0.0
    with torch.set_grad_enabled(train):
        for x, y in loader:
            out = net(x)
            loss = loss_fn(out, y)
            if train:
                opt.zero_grad()
                loss.backward()
                opt.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / total, correct / total


def run(data: Path, model: str, weights: str, size: int, mode: str, *, epochs: int = EPOCHS,
        time_limit: float | None = None, progress: Path | None = None, workers: int = 1) -> dict[str, Any]:
    """Train with the tutorial's recipe; stop after ``epochs`` or at the first epoch end past ``time_limit`` s."""
    import copy

    import torch

    start = time.perf_counter()
    torch.manual_seed(0)
    probe = build(model, weights, size, 2, mode)
    train, val, classes = _loaders(data, probe.preprocessing, workers)
    net = build(model, weights, size, len(classes), mode)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP, gamma=GAMMA)
    history: list[dict[str, Any]] = []
    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        tr_loss, tr_acc = _epoch(net, train, opt, True)
        sched.step()
        va_loss, va_acc = _epoch(net, val, None, False)
        row = {"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc, "val_loss": va_loss,
               "val_acc": va_acc, "seconds": time.perf_counter() - t0}
        history.append(row)
        if va_acc > best:
            best, best_state = va_acc, copy.deepcopy(net.state_dict())
        common.log(f"tutorial {mode} {model}: epoch {epoch}/{epochs} val {va_acc:.4f} "
                   f"(train {tr_acc:.4f}, {row['seconds']:.0f}s)")
        if progress:
            with progress.open("a") as f:
                f.write(json.dumps(common.round_floats(row)) + "\n")
        if time_limit is not None and time.perf_counter() - start > time_limit and epoch < epochs:
            break
    del best_state  # the tutorial loads it back; its accuracy is ``best`` already
    return {"val_acc": history[-1]["val_acc"], "best_val_acc": best, "epochs_run": len(history),
            "epochs_planned": epochs, "stopped_by_time_limit": len(history) < epochs,
            "seconds": time.perf_counter() - start, "val_acc_per_epoch": [round(r["val_acc"], 4) for r in history],
            "trained_parameters": sum(p.numel() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ (or validation/)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mode", choices=("fixed", "finetune"), default="fixed")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop at the first epoch end past it")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    common.setup_torch(args.threads)
    result = run(args.data, args.model, args.weights, args.input_size, args.mode, epochs=args.epochs,
                 time_limit=args.time_limit)
    common.emit(common.round_floats({"benchmark": "tutorial_recipe", "mode": args.mode, "model": args.model,
                                     **result}))


if __name__ == "__main__":
    main()
