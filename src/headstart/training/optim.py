"""The training schedule: stages, parameter groups, optimizers and learning-rate schedules.

Parameter groups are built in one place (:func:`param_groups`): only trainable parameters, no
weight decay on biases and normalisation parameters, and a learning rate per depth group for
discriminative fine-tuning. At every stage boundary the optimizer and the scheduler are built
anew from the stage, so a group unfrozen later always gets the rate the schedule gives it.

Example::

    >>> from headstart.models.backbones import build_network
    >>> from headstart.config import StageConfig
    >>> net = build_network("resnet18", weights="none", num_classes=3)
    >>> stage = StageConfig(name="ft", epochs=1, freeze="none", lr=1e-3, layer_decay=0.5)
    >>> groups = param_groups(net, stage, base_lr=1e-3, weight_decay=0.01)
    >>> [(g["name"], g["lr"]) for g in groups if g["weight_decay"]][:2]
    [('stem', 3.125e-05), ('layer1', 6.25e-05)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from headstart.config import RunConfig, StageConfig, TrainConfig
from headstart.errors import HeadstartError
from headstart.models.freeze import bn_mode, count_params, freeze, trainable_state, unfreeze_last
from headstart.models.network import Network
from headstart.training.cache import cacheable_part
from headstart.training.head_solver import solvable_final

SCHEDULERS = ("cosine", "onecycle", "constant")


def resolve_stages(cfg: TrainConfig, net: Network) -> list[StageConfig]:
    """The stages to run: ``cfg.stages`` when given, else the seed's two phases or gradual unfreezing.

    Stages of 0 epochs are left out; a negative epoch count is an error.
    """
    if cfg.stages:
        # A stage without its own rate takes train.lr (which may be "auto").
        return _with_epochs([dataclasses.replace(s, lr=s.lr if s.lr is not None else cfg.lr) for s in cfg.stages])
    stages = [head_stage(cfg, net)]
    if cfg.schedule == "gradual":
        # ULMFiT-style: one more depth group joins every epoch, deepest first.
        for k in range(1, len(net.groups) + 1):
            stages.append(finetune_stage(cfg, f"unfreeze-{net.groups[-k].name}", 1, unfreeze_last(net, k),
                                         layer_decay=1.0))
    elif cfg.schedule != "two-phase":
        raise HeadstartError(f"unknown schedule {cfg.schedule!r}: use two-phase or gradual (or list stages)")
    if cfg.finetune_epochs > 0:
        stages.append(finetune_stage(cfg, "finetune", cfg.finetune_epochs, unfreeze_last(net, cfg.finetune_unfreeze)))
    return _with_epochs(stages, {"head": "--epochs", "finetune": "--finetune-epochs"})


def finetune_stage(cfg: TrainConfig, name: str, epochs: int, freeze: str,
                   layer_decay: float | None = None) -> StageConfig:
    """A fine-tuning stage with the ``train.finetune_*`` recipe: its rate, warm-up, BatchNorm policy,
    layer decay, the head's multiple of the rate and the weight average (the two-phase schedule, gradual unfreezing and
    the budget's planned stage all fine-tune this way)."""
    return StageConfig(name=name, epochs=epochs, freeze=freeze, lr=cfg.finetune_lr,
                       layer_decay=cfg.layer_decay if layer_decay is None else layer_decay,
                       bn=cfg.finetune_bn, warmup=cfg.finetune_warmup, warmup_steps=cfg.finetune_warmup_steps or None,
                       average=cfg.finetune_average,
                       lr_mult={"head": cfg.finetune_head_mult} if cfg.finetune_head_mult != 1.0 else {})


# ``train.epochs: auto`` for heads that cannot be solved (a frozen-body head stage is needed, and a
# Linear final layer): the fixed count that was the default before the solver.
AUTO_EPOCHS = 5
# ``auto`` with an mlp head: its hidden layers train this many AdamW epochs, then the final layer is solved.
AUTO_MLP_EPOCHS = 5


def head_stage(cfg: TrainConfig, net: Network) -> StageConfig:
    """The first phase: ``train.epochs`` epochs of the head, or with ``auto`` a solved head.

    ``auto`` solves the final layer (see :mod:`headstart.training.head_solver`) when the body
    is frozen and the head ends in a Linear layer: a ``replace`` or ``linear`` head is solved
    with no epochs first, an ``mlp`` head after :data:`AUTO_MLP_EPOCHS` epochs of its hidden layers.
    """
    stage = StageConfig(name="head", epochs=0, freeze=cfg.freeze, lr=cfg.lr)
    if cfg.epochs != "auto":
        return dataclasses.replace(stage, epochs=int(cfg.epochs))
    if cfg.freeze != "body" or solvable_final(net.head) is None:
        return dataclasses.replace(stage, epochs=AUTO_EPOCHS)
    return dataclasses.replace(stage, epochs=AUTO_MLP_EPOCHS if net.head_config.kind == "mlp" else 0, solve=True)


def stage_rows(stage: StageConfig) -> int:
    """Epoch rows a stage records: its epochs, and one more when it solves the head at the end."""
    return stage.epochs + int(stage.solve)


def _with_epochs(stages: list[StageConfig], flags: dict[str, str] | None = None) -> list[StageConfig]:
    for s in stages:
        if s.epochs < 0:
            where = (flags or {}).get(s.name, "its epochs in train.stages")
            raise HeadstartError(f"stage {s.name!r} has {s.epochs} epochs: give 0 (to skip it) or more ({where})")
    return [s for s in stages if stage_rows(s) > 0]


def lr_flag(cfg: TrainConfig, stage: StageConfig) -> str:
    """Where the user sets ``stage``'s base learning rate: a command-line flag, or the stage's entry."""
    if cfg.stages:
        return f"the lr of stage {stage.name!r} in train.stages"
    return "--lr" if stage.name == "head" else "--finetune-lr"


def apply_stage(net: Network, stage: StageConfig) -> None:
    """Freeze what the stage freezes, set its BatchNorm policy, enable aux heads when they train."""
    freeze(net, stage.freeze)
    net.bn_policy = stage.bn
    aux_trains = any(p.requires_grad for path in net.aux for p in net.body.get_submodule(path).parameters())
    net.set_aux(aux_trains)


@dataclass
class StagePlan:
    """One stage as it applies to a network: what it trains, at which rates, what it reads from the cache.

    ``lr`` is the stage's base rate, or ``"auto"`` until the range test has chosen it; ``lrs``
    holds each group's rate (with ``auto``: its multiplier of the rate to be chosen). ``states``
    and ``bn_modes`` map each depth group (and ``head``) to trainable / frozen / partial and to
    its BatchNorm mode in training; ``cache`` says what the feature cache would give the stage.
    """

    name: str
    epochs: int
    lr: float | str
    warmup: float  # the fraction of the stage's steps spent warming up (see stage_warmup)
    layer_decay: float
    freeze: str
    bn: str
    states: dict[str, str]
    bn_modes: dict[str, str]
    lrs: dict[str, float]
    cache: str
    trainable: int
    total: int
    solve: bool = False  # the final layer is solved after the epochs (one more epoch row)
    average: float = 0.0  # the weight average's span, a fraction of the stage's steps (0: none)
    warmup_steps: int | None = None  # the steps the warm-up's climb to the full rate takes (see warmup_steps)

    @property
    def what(self) -> str:
        """The stage in a few words."""
        return "freeze the body, train the classifier" if self.freeze == "body" else "unfreeze and fine-tune"


def describe_stage(net: Network, stage: StageConfig, cfg: RunConfig) -> StagePlan:
    """Apply ``stage`` to ``net`` (freezing, BatchNorm policy, aux heads, as training does) and describe it.

    Example::

        >>> from headstart.models.backbones import build_network
        >>> net = build_network("resnet18", weights="none", num_classes=3)
        >>> plan = describe_stage(net, StageConfig(name="head", epochs=2, freeze="body", lr=1e-3), RunConfig())
        >>> plan.states["layer4"], plan.states["head"], plan.trainable, plan.cache
        ('frozen', 'trainable', 1539, "the whole body's features, computed once")
    """
    apply_stage(net, stage)
    lr = stage.lr if stage.lr is not None else cfg.train.lr
    total, trainable = count_params(net)
    return StagePlan(name=stage.name, epochs=stage.epochs, lr=lr, warmup=stage_warmup(stage, cfg.train),
                     layer_decay=stage.layer_decay,
                     freeze=stage.freeze, bn=stage.bn, states=trainable_state(net), bn_modes=bn_mode(net),
                     lrs=group_lrs(net, stage, 1.0 if lr == "auto" else float(lr)), cache=cache_plan(net, cfg),
                     trainable=trainable, total=total, solve=stage.solve, average=stage.average,
                     warmup_steps=stage.warmup_steps)


def cache_plan(net: Network, cfg: RunConfig) -> str:
    """What a stage, as ``net`` is frozen now, would read from the feature cache.

    Training checks more once it has the data (MixUp/CutMix, the prefix's size against
    ``cache.max_gb``): see :class:`headstart.training.inputs.StageInputs`.
    """
    part, cut = cacheable_part(net, cfg.cache)
    if part == "body":
        return "the whole body's features, computed once"
    if part == "prefix" and net.chain is not None:
        return f"the frozen first {cut} of {len(net.chain)} body steps (up to {net.chain[cut - 1].name}), computed once"
    if not cfg.cache.enabled:
        return "off"
    if net.bn_policy == "train":
        return "none (frozen BatchNorm uses batch statistics)"
    return "none (images go through the whole network every epoch)"


def group_lrs(net: Network, stage: StageConfig, base_lr: float) -> dict[str, float]:
    """Learning rate of each depth group and the head under ``stage``."""
    names = [g.name for g in net.groups]
    unknown = set(stage.lr_mult) - set(names) - {"head"}
    if unknown:
        raise HeadstartError(f"lr_mult names unknown group(s) {sorted(unknown)}; groups are {names + ['head']}")
    lrs = {n: base_lr * stage.layer_decay ** (len(names) - i) for i, n in enumerate(names)}
    lrs["head"] = base_lr
    return {n: lr * stage.lr_mult.get(n, 1.0) for n, lr in lrs.items()}


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases, norm scales/shifts and embeddings are 1-D or tokens: decaying them only hurts.
    return p.ndim <= 1 or name.endswith(("class_token", "pos_embedding", "cls_token", "pos_embed"))


def param_groups(net: Network, stage: StageConfig, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable parameters only, split by depth group and decay."""
    lrs = group_lrs(net, stage, base_lr)
    out = []
    for gname, params in net.group_params():
        live = [(n, p) for n, p in params if p.requires_grad]
        for decay in (True, False):
            chosen = [p for n, p in live if _no_decay(n, p) != decay]
            if chosen:
                wd = weight_decay if decay else 0.0
                out.append({"name": gname, "params": chosen, "lr": lrs[gname], "weight_decay": wd})
    if not out:
        raise HeadstartError(
            f"stage {stage.name!r} trains nothing: its freeze spec {stage.freeze!r} freezes everything")
    return out


def stage_lr(stage: StageConfig, cfg: TrainConfig) -> float:
    """The stage's base learning rate as a number (``auto`` must have been resolved first)."""
    lr = stage.lr if stage.lr is not None else cfg.lr
    if isinstance(lr, str):
        raise HeadstartError(f"stage {stage.name!r}: learning rate {lr!r} must be a number or auto")
    return float(lr)


def build_optimizer(net: Network, stage: StageConfig, cfg: TrainConfig) -> torch.optim.Optimizer:
    base_lr = stage_lr(stage, cfg)
    groups = param_groups(net, stage, base_lr, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(groups, lr=base_lr, decoupled_weight_decay=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise HeadstartError(f"unknown optimizer {cfg.optimizer!r}: use adamw, radam or sgd")


def lr_factor(step: int, total: int, warmup: float, kind: str = "cosine", climb: int | None = None) -> float:
    """Multiplier of each group's rate at ``step`` of ``total``: linear warmup, then cosine to 0.

    ``onecycle`` warms up over 30% of the steps by default and anneals to 1/1000 of the peak.
    With ``climb`` the warm-up lasts at most ``climb`` steps, and a stage whose warm-up is shorter
    peaks below the full rate (see :func:`warmup_steps`).
    """
    total = max(1, total)
    if kind == "constant":
        return 1.0
    if kind not in SCHEDULERS:
        raise HeadstartError(f"unknown scheduler {kind!r}: use {', '.join(SCHEDULERS)}")
    warm, peak = warmup_steps(total, warmup if kind == "cosine" else max(warmup, 0.3), climb)
    if step < warm:
        return peak * (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    floor = 1e-3 if kind == "onecycle" else 0.0
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def warmup_steps(total: int, warmup: float, climb: int | None = None) -> tuple[int, float]:
    """The warm-up of a ``total``-step stage, in steps, and the peak it climbs to (a fraction of the rate).

    Without ``climb`` the warm-up is the ``warmup`` fraction of the steps and climbs to the full
    rate. With it the rate climbs at one ``climb``-th of the full rate per step: a long stage
    reaches the full rate after ``climb`` steps, and a stage whose ``warmup`` fraction is fewer
    steps stops climbing there and peaks lower (fine-tuning: :func:`finetune_stage`).

    Example::

        >>> warmup_steps(1000, 0.5, climb=60), warmup_steps(40, 0.5, climb=60), warmup_steps(40, 0.5)
        ((60, 1.0), (20, 0.3333333333333333), (20, 1.0))
    """
    warm = round(total * warmup)
    if climb is None or warm == 0:
        return warm, 1.0
    warm = min(warm, climb)
    return warm, warm / climb


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig,
                    stage: StageConfig | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule over one stage; it scales every group's own rate by the same factor.

    The stage's own ``warmup`` wins over ``train.warmup`` (:func:`stage_warmup`).
    """
    warmup = stage_warmup(stage, cfg) if stage is not None else cfg.warmup
    climb = stage.warmup_steps if stage is not None else None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler, climb))


def stage_warmup(stage: StageConfig, cfg: TrainConfig) -> float:
    """The fraction of ``stage``'s steps spent warming up: its own, else ``train.warmup``."""
    return stage.warmup if stage.warmup is not None else cfg.warmup


def stage_climb(stage: StageConfig, cfg: TrainConfig, total: int) -> tuple[int, float]:
    """The warm-up of ``stage`` over ``total`` steps, in steps, and the peak it reaches, as the scheduler runs it."""
    warmup = stage_warmup(stage, cfg)
    return warmup_steps(max(1, total), warmup if cfg.scheduler == "cosine" else max(warmup, 0.3), stage.warmup_steps)
