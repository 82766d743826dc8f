"""The evaluation job: a trained model on a data source's validation split or a folder of images."""

from __future__ import annotations

from pathlib import Path

from headstart.data import make_loader
from headstart.evaluation.evalset import evaluation_images
from headstart.evaluation.inference import evaluate
from headstart.evaluation.metrics import ClassReport
from headstart.models import checkpoint
from headstart.runtime.device import pick_device


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data_source: str,
    *,
    split: str = "auto",
    batch_size: int = 64,
    tta: bool = False,
    device: str = "auto",
    strict: bool = False,
) -> ClassReport:
    """Evaluate a checkpoint on a data source's validation split (or every image of a folder)."""
    net, ckpt = checkpoint.load_network(ckpt_path)
    dataset, _, _ = evaluation_images(ckpt, net.preprocessing, data_source, split=split, strict=strict)
    dev = pick_device(device)
    net.to(dev)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=None, seed=0)
    return evaluate(net, loader, list(ckpt["classes"]), dev, progress=True, tta=tta)

