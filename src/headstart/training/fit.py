"""``fit``: the stages of the schedule one after another, with best tracking, checkpoints and console lines.

``fit`` runs the stages of the schedule (see :mod:`headstart.training.optim`) one after another.
Each epoch is seeded from the run's seed and its index (:mod:`headstart.training.sampling`), so a
run on the CPU repeats exactly and a run resumed from its last checkpoint continues exactly as if
it had never stopped (:mod:`headstart.training.state`). A run that diverges (a loss or weights
that are not finite, or an fp16 scaler that keeps skipping steps) stops with a
:class:`~headstart.training.loop.Diverged` error naming the stage, epoch and step; nothing
non-finite is ever written, so ``last.pt`` and ``best.pt`` stay as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from headstart.config import RunConfig, StageConfig
from headstart.data import DataBundle, make_loader
from headstart.errors import HeadstartError
from headstart.evaluation.inference import evaluate
from headstart.evaluation.metrics import ClassReport
from headstart.models.network import Network
from headstart.runtime.device import pick_device, seed_everything, set_cpu_speed_flags
from headstart.runtime.distributed import all_sum, init_from_env, local_device
from headstart.training import budget
from headstart.training.averaging import WeightAverage
from headstart.training.budget import PATIENCE, PLANNED, Deadline, make_plan, parse_duration, planned_stage, with_plan
from headstart.training.console import climb_line, epoch_line, stage_lines
from headstart.training.head_solver import solvable_final, solve_head
from headstart.training.inputs import BodyEngine, StageInputs
from headstart.training.loop import (
    Diverged,
    EpochProgress,
    EpochStats,
    build_loss,
    diverged_text,
    inverse_frequency,
    optimizer_lrs,
    train_one_epoch,
    weights_finite,
)
from headstart.training.lr_find import stage_rate
from headstart.training.optim import (
    build_optimizer,
    build_scheduler,
    describe_stage,
    resolve_stages,
    stage_rows,
)
from headstart.training.runs import RunDir
from headstart.training.sampling import epoch_loader, epoch_seed, steps_per_epoch
from headstart.training.state import CheckpointWriter, FitState, MidEpochClock, StageRun, continue_epoch, rng_state


@dataclass
class FitResult:
    """What a fit did. ``epochs_run`` counts the epochs this call trained: 0 means nothing was trained.

    ``best_checkpoint`` is the run folder's ``best.pt`` when one exists (None without a run
    folder, or when no epoch was ever saved); ``best_accuracy`` is -1 when no epoch has run.
    """

    best_accuracy: float
    final: ClassReport | None
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    seconds: float = 0.0
    epochs_run: int = 0
    best_checkpoint: Path | None = None
    plan: dict[str, Any] | None = None  # what --budget measured and chose


@dataclass
class _Fit:
    """What stays the same through one call of :func:`fit`, with the state that moves on."""

    net: Network
    data: DataBundle
    cfg: RunConfig
    run: RunDir | None
    say: Callable[[str], None]
    device: torch.device
    loss_fn: nn.Module
    state: FitState
    started: float
    writer: CheckpointWriter | None
    clock: MidEpochClock | None
    epochs_run: int = 0
    deadline: Deadline | None = None  # --budget
    body_engine: BodyEngine | None = None


def fit(
    net: Network,
    data: DataBundle,
    cfg: RunConfig,
    run: RunDir | None = None,
    *,
    resume: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
    body_engine: BodyEngine | None = None,
) -> FitResult:
    """Train ``net`` on ``data`` through every stage of ``cfg.train``'s schedule.

    With ``run`` the resolved config, per-epoch metrics and checkpoints (``best.pt`` by validation
    accuracy, ``last.pt`` with the full training state) are written to the run folder. ``resume``
    is a ``last.pt`` checkpoint to continue from, mid-schedule. Raises
    :class:`~headstart.training.loop.Diverged` (a :class:`HeadstartError`) when training diverges.
    ``body_engine`` runs the frozen body for the feature cache (see :class:`StageInputs`; None: PyTorch).
    """
    job = _start(net, data, cfg, run, resume, say)
    job.body_engine = body_engine
    stages = resolve_stages(job.cfg.train, net)
    plans = job.deadline is not None and budget_plans(job.cfg)
    if plans and job.state.plan is not None:  # resumed: the plan chosen before the stop
        stages = with_plan(stages, job.state.plan, net, job.cfg)
    job.state.skip_finished_stage(stages)
    final: ClassReport | None = None
    for si, stage in enumerate(stages):  # a --budget plan appends its stage while this runs
        if si < job.state.stage:
            continue
        final = _train_stage(job, si, stage, len(stages) + int(plans and job.state.plan is None)) or final
        job.state.next_stage(si)
        if plans and job.state.plan is None and si == len(stages) - 1:
            stages += [s for s in [_plan(job)] if s is not None]
    if final is None:  # nothing trained (no epochs, or a resumed, finished run): evaluate once
        final = evaluate(net, make_loader(data.val, batch_size=cfg.data.batch_size * 2, shuffle=False,
                                          workers=cfg.data.workers, seed=cfg.train.seed), data.classes, job.device,
                         micro_batch=cfg.train.micro_batch)
    folder = job.run.path if job.run is not None else None
    best = folder / "best.pt" if folder is not None and (folder / "best.pt").exists() else None
    return FitResult(job.state.best, final, job.state.history, folder, time.perf_counter() - job.started,
                     job.epochs_run, best, job.state.plan)


def budget_plans(cfg: RunConfig) -> bool:
    """Whether ``--budget`` chooses the fine-tuning plan: not when the fine-tuning stages are given explicitly."""
    tc = cfg.train
    return tc.budget is not None and tc.finetune_epochs == 0 and not tc.stages and tc.schedule == "two-phase"


def _plan(job: _Fit) -> StageConfig | None:
    """Choose the fine-tuning plan against the time left, say it, and keep it in the fit's state."""
    assert job.deadline is not None
    plan = make_plan(job.net, job.data, job.cfg, job.device, job.deadline)
    for line in plan.lines():
        job.say(line)
    job.state.plan = plan.to_dict()
    return planned_stage(job.state.plan, job.net, job.cfg)


def fit_until(net: Network, data: DataBundle, cfg: RunConfig, stage_index: int, *,
              say: Callable[[str], None] = print) -> FitResult:
    """Train the stages of ``cfg``'s schedule before ``stage_index`` (0-based), as ``train`` would, in no run folder.

    What ``headstart lr-find --stage N`` runs first, so that its test starts where stage N
    would: from the trained head rather than the new, untrained one.
    """
    cfg = copy.deepcopy(cfg)
    cfg.train.stages = resolve_stages(cfg.train, net)[:stage_index]
    if not cfg.train.stages:
        return FitResult(-1.0, None)
    return fit(net, data, cfg, None, say=say)


def _start(net: Network, data: DataBundle, cfg: RunConfig, run: RunDir | None, resume: dict[str, Any] | None,
           say: Callable[[str], None]) -> _Fit:
    tc = cfg.train
    w = init_from_env(tc.device)
    device = pick_device(local_device(tc.device))
    if not w.main:  # only rank 0 talks and writes
        say, run = (lambda _: None), None
        cfg = copy.deepcopy(cfg)
        cfg.train.progress = False
    set_cpu_speed_flags()
    net.to(device)
    state = FitState.from_checkpoint(resume)
    writer = CheckpointWriter(run, net, data, cfg) if run is not None else None
    deadline = Deadline(parse_duration(tc.budget), budget.now() - state.seconds) if tc.budget else None
    return _Fit(net, data, cfg, run, say, device, build_loss(tc, data, device), state,
                time.perf_counter() - state.seconds, writer, MidEpochClock.for_run(run, tc), deadline=deadline)


def _train_stage(job: _Fit, si: int, stage: StageConfig, n: int) -> ClassReport | None:
    """Every remaining epoch of stage ``si``; the last epoch's validation report (None: none ran)."""
    state = job.state
    if stage.lr == "auto" and stage.epochs > 0:  # a solved head with no epochs needs no rate
        stage = stage_rate(stage, job.state, job.net, job.data, job.cfg, job.run.path if job.run else None, job.say)
    plan = describe_stage(job.net, stage, job.cfg)  # applies the stage: freezing, BatchNorm policy, aux heads
    for line in stage_lines(plan, si, n):
        job.say(line)
    inputs = StageInputs(job.net, job.data, job.cfg, job.device, job.say, job.body_engine, stage.views)
    sr = _stage_run(job, si, stage, inputs)
    if state.partial:
        job.say(f"   continuing epoch {state.epoch + 1}/{stage.epochs} after its first "
                f"{state.partial['batches']} batches")
    # An epoch's time, for the deadline: a resumed stage starts from its last epoch's (training pass only).
    took = next((r["seconds"] for r in reversed(state.history) if r.get("stage") == stage.name), 0.0)
    final: ClassReport | None = None
    epoch = state.epoch
    while epoch < stage_rows(sr.stage):  # the budget's stage may be refitted after its first epoch
        if job.deadline is not None and (why := job.deadline.why_stop(took)):
            job.say(why)
            break
        began = budget.now()
        run_row = _solve_epoch if epoch == sr.stage.epochs else _run_epoch  # a solving stage ends with its solve
        row, final = run_row(job, sr, inputs, epoch)
        # The budget's stage is refitted once its epoch and view times are known: after its first epoch, or
        # its second when it extracts augmented views (the first trains on the view extracted at setup).
        if state.plan is not None and stage.name == PLANNED and epoch + 1 == min(2, inputs.n_views):
            _refit(job, sr, budget.now() - began - inputs.view_seconds, epoch + 1, inputs.view_seconds)
        _end_epoch(job, sr, epoch, row)  # after the refit: last.pt keeps the refitted plan
        took = budget.now() - began - inputs.view_seconds  # a view's one-off extraction is not an epoch's
        if state.stopped:
            unsolved = epoch < sr.stage.epochs and sr.stage.solve
            skipped = " (the head's final layer is left as trained, not solved)" if unsolved else ""
            if epoch + 1 < stage_rows(sr.stage):  # at the stage's last row the stop changes nothing
                job.say(f"   early stop: no improvement for {state.bad_epochs} epoch(s){skipped}")
            break
        epoch += 1
    if sr.average is not None:  # the stage's model is the average it validated
        sr.average.keep()
    return final


def _refit(job: _Fit, sr: StageRun, epoch_s: float, done: int, view_s: float) -> None:
    """The budget's stage with the length :func:`budget.replan` sets, and its schedule, at the same step, over it."""
    assert job.deadline is not None and job.state.plan is not None
    line = budget.replan(job.state.plan, epoch_s, job.deadline.left(), done, view_s)
    if line is None:
        return
    job.say(line)
    stage = dataclasses.replace(sr.stage, epochs=job.state.plan["epochs"])
    sched = build_scheduler(sr.opt, steps_per_epoch(job.data.train, job.cfg) * stage.epochs, job.cfg.train, stage)
    sched.load_state_dict(sr.sched.state_dict())  # the steps taken so far
    sched.last_epoch -= 1
    sched.step()  # the rate of the current step on the refitted schedule (a new schedule set its first)
    sr.stage, sr.sched = stage, sched
    if sr.average is not None:
        sr.average.set_steps(steps_per_epoch(job.data.train, job.cfg) * stage.epochs)


def _stage_run(job: _Fit, si: int, stage: StageConfig, inputs: StageInputs) -> StageRun:
    """The stage's optimizer and per-step schedule, continuing from the saved ones when resuming mid-stage."""
    tc, state = job.cfg.train, job.state
    opt = build_optimizer(job.net, stage, tc)
    steps = steps_per_epoch(job.data.train, job.cfg) * stage.epochs
    sched = build_scheduler(opt, steps, tc, stage)
    if (line := climb_line(stage, steps, tc)) is not None:
        job.say(line)
    average = None
    if stage.average > 0:  # resumed mid-stage, the network holds the saved average and state the live weights
        average = (WeightAverage.resume(job.net, stage.average, steps, state.average) if state.average is not None
                   else WeightAverage(job.net, stage.average, steps))
    if state.resumes_mid_stage():
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        scaler = inputs.precision.scaler
        if scaler is not None and state.scaler:  # the fp16 loss scale it had reached
            scaler.load_state_dict(state.scaler)
    return StageRun(si, stage, opt, sched, inputs.precision, average)


def _run_epoch(job: _Fit, sr: StageRun, inputs: StageInputs, epoch: int) -> tuple[dict[str, Any], ClassReport]:
    """Train one epoch of the stage (or what is left of it) and validate: the epoch's row and report."""
    state, stage = job.state, sr.stage
    seed = epoch_seed(job.cfg.train.seed, state.global_epoch)
    partial, state.partial = state.partial, None  # this epoch was stopped after some of its batches
    done = partial["batches"] if partial else 0
    train_set = inputs.train_view(epoch)  # may extract an augmented view: before seeding
    seed_everything(seed)  # augmentation and dropout draws of this epoch
    loader = epoch_loader(train_set, job.cfg, seed, inputs.workers, done)
    lrs = optimizer_lrs(sr.opt) if partial is None else dict(partial["lrs"])  # the rates the epoch began with
    begun = continue_epoch(partial, job.device) if partial is not None else None
    first_step = state.step - done
    try:
        tr = _train_epoch(job, sr, inputs, epoch, loader, begun, len(loader) + done, lrs)
        if not weights_finite(job.net):
            raise Diverged("the weights are no longer finite", len(loader) + done)
    except Diverged as e:
        text = diverged_text(job.cfg.train, job.run.path if job.run else None, sr.index, sr.stage, epoch, e, first_step)
        raise Diverged(e.reason, e.batch, message=text) from None
    live = _live_accuracy(job, sr, inputs)
    with sr.averaged():
        report = inputs.validate(job.data.classes)
    state.global_epoch += 1
    setup, inputs.setup_seconds = inputs.setup_seconds, 0.0  # reported once, with the stage's first epoch
    return live | {
        "stage": stage.name, "stage_index": sr.index, "epoch": epoch + 1, "global_epoch": state.global_epoch,
        "setup_seconds": setup, "base_lr": stage.lr,
        "train_loss": tr.loss, "train_acc": tr.accuracy, "val_loss": report.loss, "val_acc": report.top1,
        "val_top5": report.top5, "seconds": tr.seconds, "images_per_s": tr.images_per_s, "lrs": lrs,
    }, report


def _live_accuracy(job: _Fit, sr: StageRun, inputs: StageInputs) -> dict[str, float]:
    """With a weight average, the validation accuracy of the weights as trained (the row's ``val_acc_live``)."""
    if sr.average is None:
        return {}
    return {"val_acc_live": inputs.validate(job.data.classes).top1}


def _solve_epoch(job: _Fit, sr: StageRun, inputs: StageInputs, epoch: int) -> tuple[dict[str, Any], ClassReport]:
    """The row of a solving stage: its head's final layer solved on the training split's plain-view features.

    The weight decay is chosen by cross-validation on those features alone (the validation split
    is only evaluated afterwards), with the loss's class weights and label smoothing; under
    ``data.balanced`` the classes are weighted by inverse frequency, as the balanced sampler
    weights them.
    """
    state, head = job.state, job.net.head
    start = time.perf_counter()
    features, targets = inputs.solve_features()
    weight = getattr(job.loss_fn, "weight", None)
    if weight is None and job.cfg.data.balanced:
        weight = inverse_frequency(targets, len(job.data.classes))
    final_layer = solvable_final(head)
    if final_layer is None:
        raise HeadstartError("the head's final layer is not a Linear layer with a bias, so it cannot be solved: "
                             "give --epochs N to train it instead")
    result = solve_head(head, final_layer, features, targets, seed=job.cfg.train.seed,
                        class_weights=None if weight is None else weight.cpu(),
                        label_smoothing=getattr(job.loss_fn, "label_smoothing", 0.0))
    seconds = time.perf_counter() - start
    job.say("   " + result.summary())
    rows = TensorDataset(torch.from_numpy(features), torch.as_tensor(targets))
    fitted = evaluate(head, make_loader(rows, batch_size=4096, shuffle=False, workers=0, seed=0),
                      job.data.classes, job.device)
    report = inputs.validate(job.data.classes)
    state.global_epoch += 1
    setup, inputs.setup_seconds = inputs.setup_seconds, 0.0
    return {
        "stage": sr.stage.name, "stage_index": sr.index, "epoch": epoch + 1, "global_epoch": state.global_epoch,
        "setup_seconds": setup, "base_lr": sr.stage.lr, "train_loss": fitted.loss, "train_acc": fitted.top1,
        "val_loss": report.loss, "val_acc": report.top1, "val_top5": report.top5, "seconds": seconds,
        "images_per_s": len(targets) / max(seconds, 1e-9), "lrs": {}, "solved": result.to_dict(),
    }, report


def _train_epoch(job: _Fit, sr: StageRun, inputs: StageInputs, epoch: int, loader: Any,
                 begun: EpochProgress | None, total_batches: int, lrs: dict[str, float]) -> EpochStats:
    """The training pass, with the per-step TensorBoard scalars and the mid-epoch checkpoints."""
    state, run, clock = job.state, job.run, job.clock

    def after_step(loss: float, o: torch.optim.Optimizer) -> None:
        state.step += 1
        if sr.average is not None:
            sr.average.update()
        if run is not None:
            run.tb_step(state.step, loss, optimizer_lrs(o))

    def on_batch(p: EpochProgress) -> None:
        if clock is None or not clock.due(p.batches, total_batches):
            return
        loss_sum, correct, seen = all_sum(p.loss_sum, p.correct, p.seen)  # all ranks take part
        if job.writer is not None:
            if not weights_finite(job.net):
                raise Diverged("the weights are no longer finite", p.batches)
            job.writer.mid_epoch(state, sr, epoch, {
                "batches": p.batches, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen),
                "seconds": p.seconds, "lrs": lrs, "base_lr": sr.stage.lr, "rng": rng_state(job.device)},
                seconds=time.perf_counter() - job.started)
        clock.saved()

    tc = job.cfg.train
    return train_one_epoch(job.net, loader, sr.opt, sr.sched, job.loss_fn, job.device, tc.progress,
                           f"{sr.stage.name} {epoch + 1}/{sr.stage.epochs}", forward=inputs.forward(),
                           precision=inputs.precision, mix=inputs.mix(), channels_last=inputs.channels_last,
                           after_step=after_step, start=begun, on_batch=on_batch if clock is not None else None,
                           micro_batch=tc.micro_batch)


def _end_epoch(job: _Fit, sr: StageRun, epoch: int, row: dict[str, Any]) -> None:
    """Record the epoch: history, console line, best tracking, checkpoints."""
    state = job.state
    state.history.append(row)
    state.seconds = time.perf_counter() - job.started
    job.epochs_run += 1
    patience, counts = job.cfg.train.patience, True
    if patience is None and state.plan is not None and sr.stage.name == PLANNED:
        # The budget's stage stops when validation stops improving, once half of its decay is over.
        per_epoch = steps_per_epoch(job.data.train, job.cfg)
        patience, counts = PATIENCE, budget.patience_counts(sr.stage, epoch + 1, job.cfg.train, per_epoch)
    state.track_best(row, patience, counts=counts)
    job.say(epoch_line(row, sr.stage))
    if job.writer is not None:
        job.writer.epoch_end(state, sr, epoch + 1, row)
    if job.clock is not None:
        job.clock.saved()
