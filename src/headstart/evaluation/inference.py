"""Inference over a loader: logits and targets, and the class report they give."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart.evaluation.metrics import ClassReport, class_report
from headstart.progress import Progress
from headstart.runtime.chunks import chunk_size, chunked


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device, progress: bool = False,
                   tta: bool = False, micro_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) for every batch of ``loader``, in eval mode; ``tta`` adds a mirrored view.

    ``micro_batch``: images per forward pass (None: auto, see :mod:`headstart.runtime.chunks`)."""
    net.eval()
    outs, targets = [], []
    bar = Progress(loader, len(loader), "eval", enabled=progress)
    for x, y in bar:
        x = x.to(device, non_blocking=True)
        size = chunk_size(x, device, micro_batch)
        logits = chunked(net, x, size).float()
        if tta:
            mirrored = chunked(net, torch.flip(x, dims=[3]), size).float()
            logits = (logits.softmax(1) + mirrored.softmax(1)).div(2).log()
        outs.append(logits.cpu())
        targets.append(y)
        bar.update(y.shape[0])
    return torch.cat(outs), torch.cat(targets)


def evaluate(net: nn.Module, loader: DataLoader, classes: list[str], device: torch.device,
             progress: bool = False, tta: bool = False, micro_batch: int | None = None) -> ClassReport:
    logits, targets = predict_logits(net, loader, device, progress, tta, micro_batch)
    return class_report(logits, targets, classes)
