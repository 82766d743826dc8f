"""The training job: build the network and data, narrate the seed's steps, fit, save, report.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headstart.config import RunConfig, apply_overrides, from_dict, validate
from headstart.data import build_data
from headstart.errors import HeadstartError
from headstart.models import checkpoint
from headstart.models.backbones import build_network
from headstart.models.freeze import count_params
from headstart.models.network import Network
from headstart.runtime.device import pick_device, seed_everything
from headstart.training import fit as fitting
from headstart.training.budget import parse_duration, with_plan
from headstart.training.console import outcome_lines
from headstart.training.fit import FitResult
from headstart.training.optim import resolve_stages, stage_rows
from headstart.training.runs import RunDir

# The digits are 8x8 pixels: 64 px keeps every pretrained stage's receptive field meaningful at a
# twelfth of 224 px's compute.
DIGITS_INPUT_SIZE = 64


def prepare(cfg: RunConfig, say: Callable[[str], None] | None = None) -> tuple[Network, Any]:
    """Build the network and the data a config describes, the head sized to the data's classes.

    With ``say``, the seed's first steps are narrated as they happen: the pretrained model as
    loaded (its own classifier and parameter count), then the data, then the new classifier.
    """
    validate(cfg)  # a tree built or changed in Python is checked as flags and YAML are
    seed_everything(cfg.train.seed)  # random initialisation and the new head's weights repeat
    net = build_network(cfg.model.name, cfg.model.weights, input_size=input_size(cfg))
    if say is not None:
        say(describe_loaded(net, cfg))
    data = _training_data(cfg, net)
    net.replace_head(len(data.classes), cfg.head)
    if say is not None:
        say(describe_new_head(net, data, cfg))
    return net, data


def input_size(cfg: RunConfig) -> int | None:
    """The input size a run uses: the config's, else 64 px for the digits, else the weights' own."""
    if cfg.model.input_size is None and cfg.data.source == "digits":
        return DIGITS_INPUT_SIZE
    return cfg.model.input_size


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


def fit(net: Network, data: Any, cfg: RunConfig, run: RunDir | None = None, *,
        resume: dict[str, Any] | None = None, say: Callable[[str], None] = print) -> FitResult:
    """:func:`headstart.training.fit.fit` with the feature cache's engine that ``cfg.cache.engine`` names.

    The training layer cannot import ONNX Runtime's code (it sits in ``deploy``, above it), so the
    job hands it down; ``training.fit.fit`` itself runs the frozen body in PyTorch.
    """
    from headstart.deploy.features import body_engine

    return fitting.fit(net, data, cfg, run, resume=resume, say=say, body_engine=body_engine(cfg.cache.engine))


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
        net, data = _rebuild_for_resume(cfg, state)  # refuses data whose classes changed
        finished = _finished_result(resume, cfg, state)
        if finished is not None:
            say(f"{resume} has finished all its {len(finished.history)} epoch(s): nothing left to train; "
                f"its model is {Path(resume) / 'best.pt'}")
            return finished
        run = RunDir(resume, tensorboard=w.main and cfg.tensorboard)
        if w.main:
            run.truncate_history(len(state["train_state"]["history"]))
        say(f"resuming {run.path} after epoch {state['train_state']['global_epoch']}: {net.name} "
            f"(weights {cfg.model.weights}, restored from the checkpoint), {data.source}")
    else:
        cfg = validate(cfg)  # before anything is created: no run folder for a bad value
        net, data = prepare(cfg, say=say)
        resolve_stages(cfg.train, net)  # a bad schedule (negative epochs) is refused before the run folder exists
        if cfg.train.budget is not None:
            parse_duration(cfg.train.budget)  # so is a budget without units
        run = RunDir.new(cfg, tensorboard=cfg.tensorboard) if w.main else None
        if run is not None:
            run.write_config(cfg)
    result = fit(net, data, cfg, run if w.main else None, resume=state, say=say)
    if not w.main:  # rank 0 writes everything below
        return result
    info = summary(net, data, cfg, result, time.perf_counter() - started)
    run.write_summary(info)
    _tensorboard_final(run, cfg, result)
    run.close()
    if result.epochs_run == 0:  # every stage had 0 epochs: no checkpoint was written
        say(f"\nnothing was trained: every stage has 0 epochs, so there is no model ({run.path} holds "
            "only the config); give --epochs or --finetune-epochs a positive number")
        return result
    say(f"\nfinal validation accuracy {result.final.top1:.2%} (best {result.best_accuracy:.2%}); "
        f"model saved to {result.best_checkpoint}")
    for line in outcome_lines(result.history, len(data.classes)):
        say(line)
    if cfg.report:
        _write_report(run, say)
    return result


def _finished_result(resume: str | Path, cfg: RunConfig, state: dict[str, Any]) -> FitResult | None:
    """The run's result when its last checkpoint already holds every epoch of the schedule (or an
    early stop), else None: resuming such a run redoes nothing and rewrites nothing."""
    ts = state["train_state"]
    if ts.get("partial"):
        return None
    net = checkpoint.load_network(state)[0]
    stages = resolve_stages(cfg.train, net)
    if fitting.budget_plans(cfg):  # the --budget stage, once planned, is part of the schedule
        if ts.get("plan") is None:
            return None  # stopped before the plan was made
        stages = with_plan(stages, ts["plan"], net, cfg)
    total = sum(stage_rows(s) for s in stages)
    if not ts.get("stopped") and ts["global_epoch"] < total:
        return None
    history = list(ts["history"])
    return FitResult(best_accuracy=ts.get("best", -1.0), final=None, history=history, run_dir=Path(resume))


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
    if result.final is not None and run.has_tensorboard:
        from headstart.report import confusion_heatmap_png

        png = confusion_heatmap_png(result.final)
    hparams = {"model": cfg.model.name, "weights": cfg.model.weights, "head": cfg.head.kind,
               "lr": cfg.train.lr, "finetune_lr": cfg.train.finetune_lr, "epochs": cfg.train.epochs,
               "finetune_epochs": cfg.train.finetune_epochs, "batch_size": cfg.data.batch_size,
               "optimizer": cfg.train.optimizer, "freeze": cfg.train.freeze, "seed": cfg.train.seed}
    metrics = {"best_val_acc": result.best_accuracy,
               "final_val_acc": result.final.top1 if result.final else float("nan")}
    run.tb_final(hparams, metrics, png)


def _write_report(run: RunDir, say: Callable[[str], None]) -> None:
    from headstart.report import write_report

    try:
        say(f"report: {write_report(run.path)}")
    except HeadstartError as e:  # the model is saved; a report that cannot be drawn is no failure
        say(f"report not written: {e}")


def describe_loaded(net: Network, cfg: RunConfig) -> str:
    """Steps 1 and 2 of the seed, as text: the pretrained model as loaded, its body and its own head."""
    from headstart.jobs.describe import group_table

    total, _ = count_params(net)
    body = ", ".join(n for n, m in net.body.named_children() if not isinstance(m, torch.nn.Identity))
    return "\n".join([
        f"== 1. load: {net.name} ({net.source}, weights {_weights_text(cfg.model.weights, net.weights_name)}), "
        f"{total:,} parameters as loaded, input {net.preprocessing.crop}px",
        f"== 2. understand: body (feature extractor) = {body}; depth groups:",
        group_table(net),
        f"   head (the pretrained classifier, {net.num_classes} outputs):",
        _indent(str(net.head)),
    ])


def describe_new_head(net: Network, data: Any, cfg: RunConfig) -> str:
    """Steps 3 and 4 of the seed, as text: what the first stage freezes, and the new classifier."""
    counts = data.class_counts()
    total, _ = count_params(net)
    head = sum(p.numel() for p in net.head.parameters())
    return "\n".join([
        f"== data: {data.source}: {len(data.classes)} classes, {sum(counts['train'].values())} train / "
        f"{sum(counts['val'].values())} validation images",
        f"== 3. freeze: {_freeze_text(cfg.train.freeze)} for the first stage (BatchNorm keeps its statistics)",
        f"== 4. new classifier for {len(data.classes)} classes ({net.head_config.kind}, {head:,} parameters; "
        f"{total:,} in all):",
        _indent(str(net.head)),
    ])


def describe_job(net: Network, data: Any, cfg: RunConfig) -> str:
    """Steps 1-4 for a network already re-headed (the pretrained head is no longer there to show)."""
    return describe_new_head(net, data, cfg)


def _freeze_text(spec: str) -> str:
    if spec == "body":
        return "the whole body (only the classifier trains)"
    if spec == "none":
        return "nothing (every layer trains)"
    if spec.isdigit():
        return f"the first {spec} depth group(s)"
    return f"parameters matching {spec}"


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


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
        "weights_loaded": net.weights_name,  # what DEFAULT resolved to on this machine
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
        "budget_plan": result.plan,
    }
