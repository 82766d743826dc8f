"""``headstart train`` and ``headstart lr-find``: the commands driven by a whole run config."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from headstart.cli.flags import add_config_flags, given, resolve_config, resumable_flags, set_overrides
from headstart.config import RunConfig, settings
from headstart.errors import HeadstartError


def _add_config_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, flag or not (train.stages only in YAML); "
                        "the keys are in brackets below")


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a classifier (no flags: the embedded digits demo)",
                       description="Train a classifier. Precedence: defaults < --config < flags < --set.")
    _add_config_source(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    add_config_flags(t)
    return t


def run_train(args: argparse.Namespace) -> int:
    from headstart.jobs.train import train

    if args.resume:
        changed = given(args)
        flags = {s.key: s.flag for s in settings(args.config_class)}
        resumable = {s.key for s in settings(args.config_class) if s.on_resume}
        extra = [flags[k] for k in changed if k not in resumable]
        extra += ["--config"] * bool(args.config) + [f"--set {k}" for k in set_overrides(args.set)]
        if extra:
            raise HeadstartError(f"--resume continues the run's saved config; only {', '.join(resumable_flags())} "
                                 f"may change (got {', '.join(extra)})")
        train(RunConfig(), resume=args.resume, overrides=changed)
    else:
        train(resolve_config(args))
    return 0


def add_lr_find_parser(sub: Any) -> argparse.ArgumentParser:
    lf = sub.add_parser("lr-find", help="learning-rate range test for a stage; saves the plot, suggests a rate")
    _add_config_source(lf)
    lf.add_argument("--stage", type=int, default=1, help="which stage of the schedule (1 = the head stage)")
    lf.add_argument("--steps", type=int, default=100, help="number of steps of the test")
    lf.add_argument("--plot", help="where to save the plot (PNG) (default: OUTPUT/lr-find/MODEL-DATA-stageN.png)")
    add_config_flags(lf, skip={"name", "report", "tensorboard"})
    return lf


def run_lr_find(args: argparse.Namespace) -> int:
    from headstart.jobs.train import prepare
    from headstart.training.fit import fit_until
    from headstart.training.lr_find import lr_find
    from headstart.training.optim import resolve_stages

    cfg = resolve_config(args)
    if args.stage < 1 or args.steps < 1:
        raise HeadstartError(f"--stage and --steps must be 1 or more (got --stage {args.stage}, --steps {args.steps})")
    net, data = prepare(cfg)
    stages = resolve_stages(cfg.train, net)
    if args.stage > len(stages):
        raise HeadstartError(f"--stage {args.stage}: the schedule has {len(stages)} stage(s)")
    stage = stages[args.stage - 1]
    if args.stage > 1:  # start where train would start this stage: from the trained head, not a new one
        print(f"training stage(s) 1-{args.stage - 1} first, as train does, so that the test starts where "
              f"stage {args.stage} would")
        fit_until(net, data, cfg, args.stage - 1)
    result = lr_find(net, data, cfg, stage, steps=args.steps)
    plot = Path(args.plot) if args.plot else default_plot_path(cfg, args.stage)
    plot.parent.mkdir(parents=True, exist_ok=True)
    result.save_plot(plot)
    print(f"suggested learning rate for stage {args.stage} ({stage.name}): {result.suggestion:.3g}")
    print(f"plot saved to {plot}; use it with {stage_lr_setting(cfg, args.stage, result.suggestion)}")
    return 0


def default_plot_path(cfg: RunConfig, stage: int) -> Path:
    """``<output>/lr-find/<model>-<data>-stage<N>.png``: beside the runs, not in the current folder."""
    name = f"{cfg.model.name}-{Path(cfg.data.source).name or cfg.data.source}-stage{stage}"
    return Path(cfg.output) / "lr-find" / (re.sub(r"[^\w.-]+", "-", name) + ".png")


def stage_lr_setting(cfg: RunConfig, stage: int, lr: float) -> str:
    """How to give stage ``stage`` (1-based, of the stages that run) the learning rate ``lr``."""
    if cfg.train.stages:
        from headstart.training.optim import stage_rows  # torch: not at import, --help stays fast

        listed = [i for i, s in enumerate(cfg.train.stages) if stage_rows(s) > 0][stage - 1]
        return f"lr: {lr:.3g} in train.stages[{listed}] of the YAML config (or lr: auto there)"
    if stage == 1 and cfg.train.epochs != 0:  # the head stage; with 0 epochs it is left out
        return f"--lr {lr:.3g} (or --lr auto to run this test at the start of the stage)"
    return f"--finetune-lr {lr:.3g} (or --finetune-lr auto to run this test at the start of the stage)"
