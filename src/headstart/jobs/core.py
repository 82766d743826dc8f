"""The Python API: the same jobs as the CLI, driven by the same :class:`~headstart.config.RunConfig`.

Example (the seed's workflow, offline, on the bundled digits)::

    import headstart as hs

    net = hs.build_network("mobilenet_v2", weights="IMAGENET1K_V1", input_size=64)
    print(net.body, net.head)                       # understand the model
    hs.freeze(net, "body")                          # freeze the lower layers
    data = hs.build_data(hs.DataConfig(source="digits"), net.preprocessing)
    net.replace_head(len(data.classes))             # new final layer for 10 classes
    cfg = hs.RunConfig()
    cfg.train.epochs, cfg.train.finetune_epochs = 3, 2   # train the head, then fine-tune
    result = hs.fit(net, data, cfg)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from headstart.config import DataConfig, RunConfig, apply_overrides, from_dict, to_dict
from headstart.data.core import build_data, build_transform, folder_dataset, list_images, load_image, make_loader
from headstart.errors import HeadstartError
from headstart.evaluation.evalset import remap_targets
from headstart.evaluation.inference import evaluate
from headstart.evaluation.metrics import ClassReport
from headstart.models import checkpoint
from headstart.models.backbones import build_network
from headstart.models.freeze import count_params
from headstart.models.network import Network
from headstart.runtime.device import pick_device, seed_everything
from headstart.training.engine import FitResult, fit
from headstart.training.runs import RunDir

# The digits are 8x8 pixels: 64 px keeps every pretrained stage's receptive field meaningful at a
# twelfth of 224 px's compute.
DIGITS_INPUT_SIZE = 64


def prepare(cfg: RunConfig) -> tuple[Network, Any]:
    """Build the network and the data a config describes, the head sized to the data's classes."""
    seed_everything(cfg.train.seed)  # random initialisation and the new head's weights repeat
    size = cfg.model.input_size
    if size is None and cfg.data.source == "digits":
        size = DIGITS_INPUT_SIZE
    net = build_network(cfg.model.name, cfg.model.weights, input_size=size)
    data = _training_data(cfg, net)
    net.replace_head(len(data.classes), cfg.head)
    return net, data


def _training_data(cfg: RunConfig, net: Network) -> Any:
    """The run's data; in-memory photos are transformed per batch on the GPU when that is on."""
    from headstart.data.memory import enable_batch_transforms
    from headstart.runtime.distributed import local_device

    data = build_data(cfg.data, net.preprocessing, seed=cfg.train.seed, progress=cfg.train.progress)
    device = pick_device(local_device(cfg.train.device))
    batched = cfg.data.batch_transforms
    if batched is None:  # the per-image loader keeps up with a CPU's training, not with a GPU's
        batched = device.type == "cuda"
    if batched:
        enable_batch_transforms(data, device)
    return data


def train(cfg: RunConfig, *, resume: str | Path | None = None, say: Callable[[str], None] = print,
          overrides: dict[str, Any] | None = None) -> FitResult:
    """Run a whole training job: build, fit every stage, save checkpoints and the summary.

    ``resume`` is a run folder whose ``last.pt`` the job continues from; the run's saved config
    is used (``cfg`` is ignored) with ``overrides`` applied, e.g. ``{"train.device": "cpu"}``.
    """
    from headstart.runtime.distributed import init_from_env

    started = time.perf_counter()
    state = None
    if resume is not None:
        if not Path(resume).is_dir():
            raise HeadstartError(f"--resume {resume}: no such run folder")
        state = checkpoint.read(Path(resume) / "last.pt")
        cfg = apply_overrides(from_dict(RunConfig, state["config"]), overrides or {})
    w = init_from_env(cfg.train.device)
    if not w.main:
        say = _silent
    if state is not None:
        run = RunDir(resume, tensorboard=w.main and cfg.tensorboard)
        if w.main:
            run.truncate_history(len(state["train_state"]["history"]))
        say(f"resuming {run.path} after epoch {state['train_state']['global_epoch']}")
        net, data = _rebuild_for_resume(cfg, state)
    else:
        net, data = prepare(cfg)
        run = RunDir.new(cfg, tensorboard=cfg.tensorboard) if w.main else None
        if run is not None:
            run.write_config(cfg)
    say(describe_job(net, data, cfg))
    result = fit(net, data, cfg, run if w.main else None, resume=state, say=say)
    if not w.main:  # rank 0 writes everything below
        return result
    info = summary(net, data, cfg, result, time.perf_counter() - started)
    run.write_summary(info)
    _tensorboard_final(run, cfg, result)
    run.close()
    say(f"\nfinal validation accuracy {result.final.top1:.2%} (best {result.best_accuracy:.2%}); "
        f"model saved to {run.path / 'best.pt'}")
    if cfg.report:
        _write_report(run, say)
    return result


def _rebuild_for_resume(cfg: RunConfig, state: dict[str, Any]) -> tuple[Network, Any]:
    """The network and data of an interrupted run, from its checkpoint: nothing is downloaded."""
    seed_everything(cfg.train.seed)
    net = checkpoint.load_network(state)[0]
    data = _training_data(cfg, net)
    if list(data.classes) != list(state["classes"]):
        raise HeadstartError(
            f"the data's classes changed since the run began: now {data.classes[:10]}, the run has "
            f"{list(state['classes'])[:10]}; start a new run instead of resuming"
        )
    return net, data


def _silent(_: str) -> None:
    pass


def _tensorboard_final(run: RunDir, cfg: RunConfig, result: FitResult) -> None:
    """Hyper-parameters with the final metrics, and the confusion matrix as an image."""
    png = None
    if result.final is not None and run._tb is not None:
        from headstart.report.core import confusion_heatmap_png

        png = confusion_heatmap_png(result.final)
    hparams = {"model": cfg.model.name, "weights": cfg.model.weights, "head": cfg.head.kind,
               "lr": cfg.train.lr, "finetune_lr": cfg.train.finetune_lr, "epochs": cfg.train.epochs,
               "finetune_epochs": cfg.train.finetune_epochs, "batch_size": cfg.data.batch_size,
               "optimizer": cfg.train.optimizer, "freeze": cfg.train.freeze, "seed": cfg.train.seed}
    metrics = {"best_val_acc": result.best_accuracy,
               "final_val_acc": result.final.top1 if result.final else float("nan")}
    run.tb_final(hparams, metrics, png)


def _write_report(run: RunDir, say: Callable[[str], None]) -> None:
    from headstart.report.core import write_report

    try:
        say(f"report: {write_report(run.path)}")
    except HeadstartError as e:  # the model is saved; a report that cannot be drawn is no failure
        say(f"report not written: {e}")


def describe_job(net: Network, data: Any, cfg: RunConfig) -> str:
    """The seed's first steps, as text: the model loaded, its body and head, the new classifier."""
    from headstart.jobs.describe import group_table

    total, _ = count_params(net)
    pre = net.preprocessing
    counts = data.class_counts()
    body = ", ".join(n for n, m in net.body.named_children() if not isinstance(m, torch.nn.Identity))
    return "\n".join([
        f"== 1. load: {net.name} ({net.source}, weights {_weights_text(cfg.model.weights, net.weights_name)}), "
        f"{total:,} parameters, input {pre.crop}px",
        f"== 2. understand: body (feature extractor) = {body}; head (classifier) = the new classifier below",
        group_table(net),
        f"== data: {data.source}: {len(data.classes)} classes, {sum(counts['train'].values())} train / "
        f"{sum(counts['val'].values())} validation images",
        f"== 3. new classifier for {len(data.classes)} classes ({net.head_config.kind}):",
        str(net.head),
    ])


def _weights_text(asked: str, loaded: str) -> str:
    return asked if asked == loaded else f"{asked} = {loaded}"


def summary(net: Network, data: Any, cfg: RunConfig, result: FitResult, seconds: float) -> dict[str, Any]:
    stages: dict[str, dict[str, float]] = {}
    for row in result.history:
        s = stages.setdefault(row["stage"], {"epochs": 0, "seconds": 0.0, "images_per_s": 0.0})
        s["epochs"] += 1
        s["seconds"] += row["seconds"] + row.get("setup_seconds", 0.0)  # feature caching included
        s["images_per_s"] = row["images_per_s"]
    total, trainable = count_params(net)
    return {
        "model": net.name,
        "weights": cfg.model.weights,
        "data": data.source,
        "classes": data.classes,
        "class_counts": data.class_counts(),
        "parameters": total,
        "best_val_accuracy": result.best_accuracy,
        "final_val_accuracy": result.final.top1 if result.final else None,
        "final_val_top5": result.final.top5 if result.final else None,
        "wall_seconds": seconds,
        "stages": stages,
        "epochs": len(result.history),
    }


# ---------------------------------------------------------------------- eval and predict


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


@torch.no_grad()
def predict(ckpt_path: str | Path, inputs: Sequence[str | Path], *, top_k: int = 5, device: str = "auto",
            batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify image files (folders are searched); one dict per image with its top-k classes."""
    net, ckpt = checkpoint.load_network(ckpt_path)
    paths: list[Path] = []
    for item in inputs:
        paths += list_images(item)
    classes = list(ckpt["classes"])
    tf = build_transform(net.preprocessing, train=False, augment=False, kind=ckpt.get("kind", "photo"))
    dev = pick_device(device)
    net.to(dev).eval()
    k = max(1, min(top_k, len(classes)))
    out = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = torch.stack([tf(_open(p)) for p in chunk]).to(dev)
        probs = net(x).float().softmax(1).cpu()
        conf, idx = probs.topk(k, dim=1)
        for p, c, j in zip(chunk, conf.tolist(), idx.tolist()):
            out.append({"file": str(p), "top": [{"class": classes[a], "probability": b} for a, b in zip(j, c)]})
    return out


def _open(path: Path) -> Any:
    try:
        return load_image(path)
    except HeadstartError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise HeadstartError(f"cannot read image {path}: {e}") from None


__all__ = ["prepare", "train", "evaluate_checkpoint", "predict", "remap_targets", "describe_job", "to_dict"]
