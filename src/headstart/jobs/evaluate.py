"""The evaluation job: a trained model on a data source's validation split or a folder of images."""

from __future__ import annotations

from pathlib import Path

from headstart.config import DataConfig, RunConfig, from_dict
from headstart.data import build_data, build_transform, folder_dataset, make_loader
from headstart.evaluation.evalset import remap_targets
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
    cfg = from_dict(RunConfig, ckpt["config"]) if "config" in ckpt else RunConfig()
    dcfg = DataConfig(source=data_source, root=cfg.data.root, val_split=cfg.data.val_split,
                      batch_size=batch_size, augment=False, strict=strict, in_memory=False)
    if split == "all" or (split == "auto" and Path(data_source).expanduser().is_dir()
                          and not _has_split_folders(Path(data_source).expanduser())):
        dataset = folder_dataset(data_source, strict=strict)
    else:
        bundle = build_data(dcfg, net.preprocessing, seed=cfg.train.seed)
        dataset = bundle.val if split in ("auto", "val") else bundle.train
    remap_targets(dataset, ckpt["classes"])
    dataset.transform = build_transform(net.preprocessing, train=False, augment=False, kind=ckpt.get("kind", "photo"))
    dev = pick_device(device)
    net.to(dev)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=None, seed=0)
    return evaluate(net, loader, list(ckpt["classes"]), dev, progress=True, tta=tta)


def _has_split_folders(folder: Path) -> bool:
    return (folder / "train").is_dir()
