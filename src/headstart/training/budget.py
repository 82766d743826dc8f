"""``--budget``: the seed's "unfreeze more layers if needed", decided against a wall-time budget, and shown.

After the head stage, :func:`measure_plans` times each candidate fine-tuning plan over a few real
training steps on a copy of the network (the trained one is not touched): the last K depth groups,
trained from the cached output of the frozen first part of the body on :func:`prefix_views` views
(augmented copies; their one-off extraction is counted), or the whole network. :func:`choose` then
takes the deepest plan that fits :data:`LONG_EPOCHS` epochs into what is left of the budget, else
the deepest that fits :data:`MIN_EPOCHS`, else the plan that fits the most epochs; at most
:data:`MAX_EPOCHS`. Past its warm-up and half of its decay the chosen stage stops early after
:data:`PATIENCE` epochs without a better validation accuracy or loss, and any stage stops when the
next epoch would not fit. After the chosen stage's first epoch (its second, when it extracts augmented views),
:func:`replan` sets its length again from the real time of an epoch and of a view's extraction: a
few timed steps are a noisy estimate (on clothing-small a MobileNetV2 epoch was put at 181-243 s and ran 130-140 s; a
prefix view at 21 s and took 50-70 s).

Why "long before deep": on a CPU the whole network trains 3-6x slower than its last groups from
the cached prefix, and the epochs that fit matter more than the depth (see :func:`choose`).

All timing goes through :func:`now`, so tests can run the planner and the deadline on a fake clock.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.config import RunConfig, StageConfig, TrainConfig
from headstart.data import DataBundle, make_loader
from headstart.errors import HeadstartError
from headstart.models.freeze import unfreeze_last
from headstart.models.network import Network
from headstart.runtime.chunks import batch_statistics, chunk_size, chunked, train_chunk_size
from headstart.training.cache import cache_root
from headstart.training.loop import chunk_shares
from headstart.training.optim import apply_stage, build_optimizer, finetune_stage, stage_climb

MIN_EPOCHS = 3
LONG_EPOCHS = 8  # a plan that fits this many epochs beats a deeper one that fits fewer (see choose)
MAX_EPOCHS = 30  # a cap, not a target: the budget and early stopping end a stage first
PREFIX_VIEWS = 5  # cached views a prefix plan trains on, with augmentation on: 1 plain + 4 augmented
PATIENCE = 2
SLACK = 0.05  # an epoch may end this fraction of the budget past its end
PLANNED = "finetune"  # the planned stage's name, as the two-phase schedule names fine-tuning
_UNITS = {"s": 1, "m": 60, "h": 3600}


def now() -> float:
    """The clock the budget is measured on (a test replaces it)."""
    return time.perf_counter()


def parse_duration(text: str) -> float:
    """Seconds in ``15m``, ``1h``, ``90s``, ``1h30m`` or ``2.5h``; a bare number is refused (say the unit)."""
    t = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", t)
    if not t or "".join(n + u for n, u in parts) != t:
        raise HeadstartError(f"budget {text!r} is not a duration: write it with units, e.g. 15m, 1h, 90s or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise HeadstartError(f"budget {text!r} must be longer than 0 seconds")
    return seconds


@dataclass
class Candidate:
    """One fine-tuning plan and what it was measured to cost: a one-off extraction, then per epoch."""

    groups: int  # the last ``groups`` depth groups train (all of them: the whole network)
    of: int  # depth groups in the body
    extract_s: float
    epoch_s: float
    epochs: int = 0  # how many fit in the time left (set by ``choose``)
    views: int = 1  # cached views of the frozen prefix, extracted once each (``extract_s`` counts them all)
    pooled: bool = False  # its epoch estimate was averaged with a neighbour's (see steady_epochs)

    @property
    def name(self) -> str:
        return "the whole network" if self.groups >= self.of else f"the last {self.groups} of {self.of} groups"

    def cost(self, epochs: int) -> float:
        return self.extract_s + epochs * self.epoch_s


@dataclass
class Plan:
    """What the planner saw and decided; ``chosen`` is None when not even one epoch fits."""

    budget_s: float
    left_s: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None

    def lines(self) -> list[str]:
        """The console's account: the time left, every plan with its estimate, the choice."""
        out = [f"\n== budget {self.budget_s / 60:.1f} min: {self.left_s / 60:.1f} min left after the head stage; "
               "fine-tuning plans, timed over a few steps:"]
        for c in self.candidates:
            mark = "  <- chosen" if c is self.chosen else ""
            views = f" ({c.views} views)" if c.views > 1 else ""
            pooled = "*" if c.pooled else " "
            out.append(f"   {c.name + views:<36} {c.extract_s:7.0f}s once + {c.epoch_s:6.0f}s/epoch{pooled}-> "
                       f"{c.epochs} epoch(s) fit{mark}")
        if any(c.pooled for c in self.candidates):
            out.append("   * pooled: a deeper plan timed faster than a shallower one, so their epoch estimates "
                       "are averaged (a few timed steps are noisy)")
        if self.chosen is None:
            out.append("   no plan fits one epoch in the time left: the head stage's model is the result")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "left_s": self.left_s,
                "candidates": [dataclasses.asdict(c) for c in self.candidates],
                "chosen": None if self.chosen is None else self.candidates.index(self.chosen)}


def choose(candidates: list[Candidate], left_s: float) -> Candidate | None:
    """The deepest plan that fits LONG_EPOCHS epochs in ``left_s``, else the deepest that fits MIN_EPOCHS,
    else the one that fits the most (ties: deeper).

    Why long before deep: on clothing-small (MobileNetV2, 15 minutes on 2 cores) the last 3 of 6
    groups on 5 cached views for 10 epochs reached 90.3% in 10.3 minutes, the whole network for
    the 6 epochs that fit 89.4% in 14.4 (bench/README.md, section 4); on the CIFAR subset the last
    3 groups for 8 epochs 87.5%, the whole network for 2 epochs 85.7%. Not everywhere: Lite1 on
    the CIFAR subset reached 86.3% with its last 5 of 8 groups (stopped early) and 87.1% with the
    whole network for 5 epochs.
    """
    for c in candidates:
        c.epochs = min(MAX_EPOCHS, max(0, int((left_s - c.extract_s) // c.epoch_s))) if c.epoch_s > 0 else 0
    for enough in (LONG_EPOCHS, MIN_EPOCHS):
        fitting = [c for c in candidates if c.epochs >= enough]
        if fitting:
            return max(fitting, key=lambda c: c.groups)
    some = [c for c in candidates if c.epochs >= 1]
    return max(some, key=lambda c: (c.epochs, c.groups)) if some else None


def planned_stage(plan: dict[str, Any], net: Network, cfg: RunConfig) -> StageConfig | None:
    """The fine-tuning stage a plan (as saved in ``to_dict``) runs; None when it chose none."""
    if plan.get("chosen") is None:
        return None
    c = plan["candidates"][plan["chosen"]]
    tc = cfg.train
    k = "all" if c["groups"] >= c["of"] else c["groups"]
    stage = finetune_stage(tc, PLANNED, plan.get("epochs", c["epochs"]), unfreeze_last(net, k))
    return dataclasses.replace(stage, views=c["views"]) if c.get("views", 1) > 1 else stage


def replan(plan: dict[str, Any], epoch_s: float, left_s: float, done: int, view_s: float = 0.0) -> str | None:
    """Once, after the planned stage's first ``done`` epoch(s): its length refitted to an epoch's real time.

    Sets ``plan["epochs"]`` (what :func:`planned_stage` runs from then on, and what a resumed
    run rebuilds) to the most epochs, at most :data:`MAX_EPOCHS`, whose remaining ones fit in
    ``left_s`` at ``epoch_s`` each, plus ``view_s`` (an augmented view's real extraction time) for
    each cached view they will extract first; and records what it saw. The console's line, or
    None when already refitted or the planned length stands.
    """
    if plan.get("chosen") is None or "refit" in plan:
        return None
    c = plan["candidates"][plan["chosen"]]
    planned, views = plan.get("epochs", c["epochs"]), c.get("views", 1)

    def cost(epochs: int) -> float:  # epoch e trains on view e mod views, extracted when first needed
        return (epochs - done) * epoch_s + (min(views, epochs) - min(views, done)) * view_s

    epochs = planned if epoch_s <= 0 else max([done] + [e for e in range(done, MAX_EPOCHS + 1) if cost(e) <= left_s])
    plan["refit"] = {"after": done, "epoch_s": epoch_s, "view_s": view_s, "planned": planned, "epochs": epochs}
    if epochs == planned:
        return None
    plan["epochs"] = epochs
    return (f"   budget: an epoch took {epoch_s:.0f}s (estimated {c['epoch_s']:.0f}s) and {left_s / 60:.1f} min are "
            f"left: the stage now runs {epochs} epoch(s), not {planned}; its schedule is refitted to match")


def with_plan(stages: list[StageConfig], plan: dict[str, Any], net: Network, cfg: RunConfig) -> list[StageConfig]:
    """The schedule once a plan is made: ``stages`` and the planned fine-tuning stage, if it chose one."""
    planned = planned_stage(plan, net, cfg)
    return stages + ([planned] if planned is not None else [])


def patience_counts(stage: StageConfig, done: int, tc: TrainConfig, steps_per_epoch: int) -> bool:
    """Whether ``done`` epochs of ``stage`` are far enough into its decay for early stopping to count them:
    past the warm-up and past half of the decay that follows it.

    While the rate is high validation wobbles and gains come as it falls. On clothing-small the last
    3 groups on 5 views dipped 1-2 points at epochs 2, 4 and 5 of 12 (warm-up: 6) and, stopped there
    by a patience of 2, ended at 85.0% where the same stage run to its end reached 90.3%. Counted
    from the warm-up's end, Lite1 on the CIFAR subset still stopped at epoch 8 of 13 at 85.4%, after
    three flat epochs at the top of the rate (its best, 86.3%, at epoch 5); the whole network's
    5 epochs, decayed to the end, reached 87.1%.
    """
    total = max(1, steps_per_epoch * stage.epochs)
    warm = stage_climb(stage, tc, total)[0] / total
    return done > (warm + (1 - warm) / 2) * stage.epochs


def candidate_groups(n: int) -> list[int]:
    """The plans worth timing for a body of ``n`` depth groups: the last K for every K up to 8 groups, else
    the last 1, 2, 3, a quarter, half, three quarters, all but one, and all.

    Every depth, so that the deepest plan that fits :data:`LONG_EPOCHS` uses the budget: offered
    only the last 1, 2, 3, 4 or all 8 of Lite1's groups on the CIFAR subset, the planner took the
    last 4, which ran 12 epochs in 9.6 of 15 minutes (the whole network fitted 6).
    """
    if n <= 8:
        return list(range(1, n + 1))
    return sorted({k for k in (1, 2, 3, n // 4, n // 2, 3 * n // 4, n - 1, n) if 1 <= k <= n})


def measure_plans(net: Network, data: DataBundle, cfg: RunConfig, device: torch.device) -> list[Candidate]:
    """Time every candidate plan on a copy of ``net`` (a few real steps each) and estimate its costs."""
    start = now()
    x, y = next(iter(make_loader(data.train, batch_size=cfg.data.batch_size, shuffle=True, workers=0,
                                 seed=cfg.train.seed)))
    per_load = (now() - start) / len(x)  # decoding and transforming an image: paid wherever images are read
    x, y = x.to(device), y.to(device)
    n = len(net.groups)
    views = prefix_views(cfg)
    candidates = []
    for k in candidate_groups(n):
        per_prefix, per_step, per_val, per_bytes = _time_plan(net, cfg, k, x, y)
        batches = max(1, len(data.train) // cfg.data.batch_size)
        # With a weight average validation runs twice: the average, then the weights as trained.
        epoch = batches * per_step + len(data.val) * per_val * (2 if cfg.train.finetune_average > 0 else 1)
        if per_prefix:
            # The views whose cache fits cache.max_gb (as the stage checks it); none: the plan is not offered.
            fit = int((cfg.cache.max_gb * 2**30 / per_bytes - len(data.val)) // len(data.train))
            if fit >= 1:
                kept = min(views, fit)
                cost = (per_prefix + per_load) * (len(data.train) * kept + len(data.val))
                candidates.append(Candidate(k, n, cost, epoch, views=kept))
        else:  # the images are read, decoded and transformed every epoch
            candidates.append(Candidate(k, n, 0.0, epoch + per_load * (len(data.train) + len(data.val))))
    steady_epochs(candidates)
    return candidates


def steady_epochs(candidates: list[Candidate]) -> None:
    """Make the epoch estimates of ``candidates`` (shallowest first) never fall with depth, by averaging
    each run of neighbours that does (pool adjacent violators); those are marked ``pooled``.

    A deeper plan computes and back-propagates through at least the layers of a shallower one, and
    reads a larger cached map, so its epoch cannot be shorter. Two timed steps can say otherwise: on
    clothing-small MobileNetV2's last 4 of 6 groups were timed at 142 s an epoch and its last 5 at
    100 s, and the planner chose the last 5, whose epochs then took 129 s.

    Example::

        >>> cs = [Candidate(k, 6, 0.0, s) for k, s in ((3, 38.0), (4, 142.0), (5, 100.0), (6, 150.0))]
        >>> steady_epochs(cs)
        >>> [(c.epoch_s, c.pooled) for c in cs]
        [(38.0, False), (121.0, True), (121.0, True), (150.0, False)]
    """
    blocks: list[list[Candidate]] = []
    for c in candidates:
        blocks.append([c])
        while len(blocks) > 1 and _mean_epoch(blocks[-2]) > _mean_epoch(blocks[-1]):
            last = blocks.pop()
            blocks[-1] += last
    for block in blocks:
        if len(block) > 1:
            mean = _mean_epoch(block)
            for c in block:
                c.epoch_s, c.pooled = mean, True


def _mean_epoch(block: list[Candidate]) -> float:
    return sum(c.epoch_s for c in block) / len(block)


def prefix_views(cfg: RunConfig) -> int:
    """The cached views a prefix plan trains on: ``cache.views`` when set above 1, else :data:`PREFIX_VIEWS`;
    1 without augmentation.

    The solved head already fits the plain view's features (98-99% training accuracy on
    clothing-small), so a prefix plan on that one view has little left to learn: Lite1's last 4 of 8
    groups on it ended at 88.0% against its head stage's 88.6%.
    """
    if not cfg.data.augment:
        return 1
    return cfg.cache.views if cfg.cache.views > 1 else PREFIX_VIEWS


def make_plan(net: Network, data: DataBundle, cfg: RunConfig, device: torch.device, deadline: Deadline) -> Plan:
    """Measure the candidates, then choose with what is left once measuring is done."""
    candidates = measure_plans(net, data, cfg, device)
    left = deadline.left()
    return Plan(deadline.budget_s, left, candidates, choose(candidates, left))


def _time_plan(net: Network, cfg: RunConfig, k: int, x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, float, float, int]:
    """Seconds per image of the frozen prefix, its output written to disk as the cache writes it (0: none is
    cached), per training step and per validated image; and the bytes the prefix's output takes per image."""
    probe = copy.deepcopy(net)
    tc = cfg.train
    stage = finetune_stage(tc, "probe", 1, unfreeze_last(probe, "all" if k >= len(net.groups) else k))
    apply_stage(probe, stage)
    cut = probe.frozen_prefix() if cfg.cache.enabled and probe.chain is not None and k < len(net.groups) else 0
    if tc.channels_last is not False and x.ndim == 4:  # as the stage runs it (StageInputs)
        x = x.contiguous(memory_format=torch.channels_last)
    per_prefix = 0.0
    with torch.inference_mode():
        start = now()
        probe.eval()
        a = chunked(lambda t: probe.run_steps(t, 0, cut), x, chunk_size(x, x.device, tc.micro_batch)) if cut else x
        if cut:
            _write_like_the_cache(a, cache_root(cfg.cache.dir))
            per_prefix = (now() - start) / len(x)
    a = a.clone()
    rest: Callable[[torch.Tensor], torch.Tensor] = (lambda t: probe.head(probe.run_steps(t, cut))) if cut else probe
    opt = build_optimizer(probe, stage, tc)
    loss_fn = torch.nn.CrossEntropyLoss()
    probe.train()
    size = train_chunk_size(a, a.device, tc.micro_batch, batch_statistics(probe))  # as train_one_epoch chunks
    times = []
    for _ in range(3):  # the first step warms up allocations and is not counted
        start = now()
        opt.zero_grad(set_to_none=True)
        for part, share in chunk_shares(loss_fn, y, size):
            (loss_fn(rest(a[part]), y[part]) * share).backward()
        opt.step()
        times.append(now() - start)
    probe.eval()
    with torch.inference_mode():
        start = now()
        chunked(rest, a, chunk_size(a, a.device, tc.micro_batch))
        per_val = (now() - start) / len(x)
    return per_prefix, sum(times[1:]) / 2, per_val, a[0].numel() * 4


def _write_like_the_cache(a: torch.Tensor, root: Path) -> None:
    """Write ``a`` as float32 through a flushed memory map in the cache's folder, as an extraction does.

    Early feature maps are large (MobileNetV2's up to ``features.3``: 300 KB an image), so
    writing them costs as much as computing them: without it a prefix view was estimated at 21 s
    and took 50-70 s on clothing-small; with it about 26 s, still low, which the refit corrects.
    """
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headstart-budget-", dir=root) as tmp:
        mm = np.lib.format.open_memmap(Path(tmp) / "probe.npy", mode="w+", dtype=np.float32, shape=tuple(a.shape))
        mm[:] = a.float().cpu().numpy()
        mm.flush()
        del mm


class Deadline:
    """When the run's budget ends; :meth:`fits` says whether one more epoch of a stage can still run."""

    def __init__(self, budget_s: float, started: float) -> None:
        self.budget_s, self.end = budget_s, started + budget_s

    def left(self) -> float:
        return self.end - now()

    def fits(self, epoch_s: float) -> bool:
        # One more epoch may end up to SLACK of the budget late: stopping a whole epoch early wastes more
        # (a 4-minute run on s4 stopped at 182 s when its next epoch would have ended at about 250 s).
        return self.left() + SLACK * self.budget_s >= epoch_s

    def why_stop(self, epoch_s: float) -> str | None:
        """The console's line when one more epoch of ``epoch_s`` seconds would not fit (0: not known yet)."""
        if not epoch_s or self.fits(epoch_s):
            return None
        return (f"   budget: {max(0.0, self.left()) / 60:.1f} min left and an epoch takes {epoch_s / 60:.1f} min: "
                "the stage ends here")
