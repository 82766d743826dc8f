"""Inference over a loader: logits and targets, and the class report they give."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart.evaluation.metrics import ClassReport, class_report
from headstart.progress import Progress


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device, progress: bool = False,
                   tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) for every batch of ``loader``, in eval mode; ``tta`` adds a mirrored view."""
    net.eval()
    outs, targets = [], []
    bar = Progress(loader, len(loader), "eval", enabled=progress)
    for x, y in bar:
        x = x.to(device, non_blocking=True)
        logits = net(x).float()
        if tta:
            logits = (logits.softmax(1) + net(torch.flip(x, dims=[3])).float().softmax(1)).div(2).log()
        outs.append(logits.cpu())
        targets.append(y)
        bar.update(y.shape[0])
    return torch.cat(outs), torch.cat(targets)


def evaluate(net: nn.Module, loader: DataLoader, classes: list[str], device: torch.device,
             progress: bool = False, tta: bool = False) -> ClassReport:
    logits, targets = predict_logits(net, loader, device, progress, tta)
    return class_report(logits, targets, classes)
