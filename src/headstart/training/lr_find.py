"""The learning-rate range test: raise the rate exponentially over a few hundred steps, watch the loss.

It trains the groups the stage trains (from cached features when the body is frozen, so it takes
seconds), records the smoothed loss at each rate, stops once the loss has clearly diverged, and
restores the network's weights. The suggestion is the rate where the smoothed loss falls fastest,
a little before the minimum, the usual reading of the plot.

Example::

    >>> result = lr_find(net, data, cfg)            # doctest: +SKIP
    >>> result.suggestion, result.save_plot("lr_find.png")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.config import RunConfig, StageConfig
from headstart.errors import HeadstartError
from headstart.models.network import Network
from headstart.runtime.device import pick_device, seed_everything
from headstart.runtime.distributed import world as current_world
from headstart.training.inputs import StageInputs
from headstart.training.optim import apply_stage, build_optimizer, resolve_stages
from headstart.training.sampling import epoch_loader
from headstart.training.state import FitState


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float = float("nan")

    def save_plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(self.lrs, self.losses, color="#1f77b4")
        ax.axvline(self.suggestion, color="#d62728", linestyle="--", label=f"suggested {self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title("learning-rate range test")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


def lr_find(
    net: Network,
    data: Any,
    cfg: RunConfig,
    stage: StageConfig | None = None,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    say: Callable[[str], None] = print,
) -> LRFindResult:
    """Run the range test for ``stage`` (default: the first stage of ``cfg``'s schedule) on ``net`` as it is.

    The test starts from ``net``'s weights as they are: for a later stage, train the stages
    before it first (:func:`headstart.training.fit.fit_until`), or it measures the rates that
    suit an untrained head instead.
    """
    device = pick_device(cfg.train.device)
    net.to(device)
    stage = copy.deepcopy(stage or resolve_stages(cfg.train, net)[0])
    stage.lr = 1.0  # group rates come out as their multipliers; the test scales them all
    saved = copy.deepcopy(net.state_dict())
    apply_stage(net, stage)
    inputs = StageInputs(net, data, cfg, device, say)
    opt = build_optimizer(net, stage, cfg.train)
    base = [g["lr"] for g in opt.param_groups]
    loss_fn = torch.nn.CrossEntropyLoss()
    forward = inputs.forward() or net.forward_train
    seed_everything(cfg.train.seed)
    result, avg, best = LRFindResult(), 0.0, math.inf
    ratio = (end / start) ** (1 / max(1, steps - 1))
    net.train()
    step = 0
    while step < steps:
        for x, y in epoch_loader(inputs.train_view(0), cfg, cfg.train.seed + step, inputs.workers):
            lr = start * ratio**step
            for g, b in zip(opt.param_groups, base):
                g["lr"] = lr * b
            logits, _ = forward(x.to(device))
            loss = loss_fn(logits.float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            avg = 0.9 * avg + 0.1 * float(loss.detach())
            smooth = avg / (1 - 0.9 ** (step + 1))  # bias-corrected moving average
            if not math.isfinite(smooth) or (step > 10 and smooth > 4 * best):
                step = steps  # diverged: the rest of the curve says nothing
                break
            best = min(best, smooth)
            result.lrs.append(lr)
            result.losses.append(smooth)
            step += 1
            if step >= steps:
                break
    net.load_state_dict(saved)
    result.suggestion = suggest(result.lrs, result.losses)
    return result


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The rate of steepest descent of the smoothed loss (before its minimum)."""
    if len(lrs) < 5:
        raise HeadstartError("the learning-rate range test ran too few steps; use more data or steps")
    # The first steps move the average more than the rate does: skip them.
    skip = max(3, len(lrs) // 10)
    lo = max(int(np.argmin(losses)), skip + 2)
    grads = np.gradient(np.asarray(losses[skip : lo + 1]), np.log(np.asarray(lrs[skip : lo + 1])))
    return float(lrs[skip + int(np.argmin(grads))])


def stage_rate(stage: StageConfig, state: FitState, net: Network, data: Any, cfg: RunConfig, folder: Path | None,
               say: Callable[[str], None]) -> StageConfig:
    """``stage`` with its rate set by the range test, as ``fit`` runs it for ``lr: auto`` (the plot saved in
    the run ``folder``).

    Resuming mid-stage reuses the rate chosen when the stage began (recorded in ``state``'s history).
    """
    if state.resumes_mid_stage():
        partial = state.partial or {}
        if isinstance(partial.get("base_lr"), float):  # stopped inside the stage's first epoch
            return dataclasses.replace(stage, lr=partial["base_lr"])
        chosen = [r["base_lr"] for r in state.history if r.get("stage") == stage.name and "base_lr" in r]
        if chosen:
            return dataclasses.replace(stage, lr=chosen[-1])
    if current_world().enabled:
        raise HeadstartError("lr: auto is not supported under torchrun (each rank would test its own shard); "
                             "run `headstart lr-find` in one process and pass the rate it suggests")
    result = lr_find(net, data, cfg, stage, say=lambda _: None)
    if folder is not None:
        plot = result.save_plot(folder / f"lr_find-{stage.name}.png")
        shutil.copyfile(plot, folder / "lr_find.png")  # the report shows the latest one
    say(f"   learning-rate range test for stage {stage.name}: suggested lr {result.suggestion:.3g}")
    return dataclasses.replace(stage, lr=result.suggestion)
