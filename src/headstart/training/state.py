"""Where a fit stands, and the checkpoints that let it resume exactly: FitState, RNG states, last.pt.

``last.pt`` is written after every epoch and, with ``train.checkpoint_minutes`` /
``train.checkpoint_steps``, inside epochs too (:class:`MidEpochClock` says when): then it also
holds the batches already trained in the current epoch, that epoch's running metric sums and
the random number generators' states. A resumed run rebuilds the epoch's seeded order, skips
those batches without loading their images and carries on. The checkpoint's ``train_state`` is
:meth:`FitState.to_checkpoint`'s plain dict, the format runs have always been saved in.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from headstart.config import RunConfig, StageConfig, to_dict
from headstart.data import DataBundle
from headstart.models import checkpoint
from headstart.models.network import Network
from headstart.runtime.distributed import rank0_decides
from headstart.runtime.distributed import world as current_world
from headstart.runtime.precision import Precision
from headstart.training.averaging import WeightAverage
from headstart.training.loop import EpochProgress
from headstart.training.optim import stage_rows
from headstart.training.runs import RunDir

# Set only while a stage is resumed: the states its optimizer, schedule and scaler continue from,
# and the part of the epoch already trained. Never saved as they are (see to_checkpoint).
_RESUME_ONLY = ("optimizer", "scheduler", "scaler", "partial", "average")


@dataclass
class StageRun:
    """The stage being trained: its index in the schedule, its config, optimizer, schedule and precision."""

    index: int
    stage: StageConfig
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    average: WeightAverage | None = None  # the stage's weight average, when it keeps one

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """The network holds the stage's weight average inside the block (the weights as trained without one)."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()


@dataclass
class FitState:
    """Where a fit stands: the stage and epoch to train next, the best results so far, the history.

    ``best`` is the run's best validation accuracy (what ``best.pt`` holds), ``stage_best``,
    ``stage_best_loss`` and ``bad_epochs`` the current stage's (for early stopping). ``global_epoch``
    and ``step`` count epochs and optimizer steps over the whole run; ``seconds`` is the training
    time so far.
    """

    stage: int = 0
    epoch: int = 0
    best: float = -1.0
    stage_best: float = -1.0
    stage_best_loss: float = math.inf
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    global_epoch: int = 0
    step: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    partial: dict[str, Any] | None = None
    average: dict[str, Any] | None = None  # the live weights behind a saved weight average (see averaging.py)
    plan: dict[str, Any] | None = None  # the --budget plan, once chosen (a resumed run keeps it)

    @classmethod
    def from_checkpoint(cls, resume: dict[str, Any] | None) -> FitState:
        """The state saved in a ``last.pt`` (as read by ``read_checkpoint``), or a fresh one."""
        if resume is None:
            return cls()
        saved = resume["train_state"]
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        state.history = list(state.history)
        return state

    def to_checkpoint(self, run: StageRun, epoch: int) -> dict[str, Any]:
        """The ``train_state`` of a ``last.pt`` written at ``epoch`` of ``run``'s stage."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RESUME_ONLY}
        scaler = run.precision.scaler.state_dict() if run.precision.scaler is not None else None
        out.update(stage=run.index, epoch=epoch, optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                   scaler=scaler or None, average=run.average.live_state() if run.average is not None else None)
        return out

    def resumes_mid_stage(self) -> bool:
        return self.optimizer is not None

    def skip_finished_stage(self, stages: list[StageConfig]) -> None:
        """A run saved after its stage's last epoch (or its early stop) resumes at the next stage."""
        if self.stage < len(stages) and (self.stopped or self.epoch >= stage_rows(stages[self.stage])):
            self.next_stage(self.stage)

    def next_stage(self, index: int) -> None:
        """Move on to the stage after ``index``: fresh optimizer and early-stopping counts."""
        self.stage, self.epoch, self.stopped, self.bad_epochs, self.stage_best = index + 1, 0, False, 0, -1.0
        self.stage_best_loss = math.inf
        self.optimizer = self.scheduler = self.scaler = self.partial = self.average = None

    def track_best(self, row: dict[str, Any], patience: int | None, *, counts: bool = True) -> None:
        """Best accuracy of the run (for best.pt) and of the stage (for early stopping).

        Patience counts epochs without improvement *within the stage*: fine-tuning often dips
        before it beats the head stage, and must not be stopped for that. An epoch improves when
        its validation accuracy is the stage's best or its validation loss the stage's lowest: on a
        few hundred validation images accuracy moves in steps of a few images while the loss still
        falls (clothing-small's budget run: accuracy 87.7, 86.5, 88.9, 89.4 while the loss fell
        0.40, 0.38, 0.36, 0.34: one more flat epoch and accuracy alone would have stopped it). With
        ``counts`` False an epoch without improvement is not counted either (a warm-up's epochs).
        """
        row["best"] = row["val_acc"] > self.best
        if row["best"]:
            self.best = row["val_acc"]
        better_loss = row["val_loss"] < self.stage_best_loss
        if row["val_acc"] > self.stage_best or better_loss or not counts:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.stage_best = max(self.stage_best, row["val_acc"])
        self.stage_best_loss = min(self.stage_best_loss, row["val_loss"])
        stop = patience is not None and self.bad_epochs >= patience
        self.stopped = rank0_decides(stop)  # under torchrun all ranks must leave the stage together


class CheckpointWriter:
    """Writes a run's ``best.pt`` and ``last.pt`` (and its metrics rows) as a fit goes on."""

    def __init__(self, run: RunDir, net: Network, data: DataBundle, cfg: RunConfig) -> None:
        self.run, self.net, self.data, self.cfg = run, net, data, cfg

    def _record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return checkpoint.model_record(self.net, self.data.classes, self.data.kind) | {
            "config": to_dict(self.cfg), "metrics": metrics}

    def epoch_end(self, state: FitState, run: StageRun, epoch: int, row: dict[str, Any]) -> None:
        """After ``epoch`` epochs of the stage: the metrics row, best.pt when it is the best, last.pt."""
        self.run.log_epoch(row)
        self.run.tb_epoch(row)
        with run.averaged():  # the model validated; the live weights go into train_state
            record = self._record(row)
            if row["best"]:
                checkpoint.save(self.run.path / "best.pt", record)
            checkpoint.save(self.run.path / "last.pt", record | {"train_state": state.to_checkpoint(run, epoch)})

    def mid_epoch(self, state: FitState, run: StageRun, epoch: int, partial: dict[str, Any],
                  seconds: float) -> None:
        """Inside ``epoch`` (0-based): last.pt with the part of the epoch done (``partial``)."""
        with run.averaged():  # the record holds the network's tensors: saved before they are swapped back
            record = self._record(state.history[-1] if state.history else {})
            train_state = state.to_checkpoint(run, epoch)
            train_state.update(seconds=seconds, partial=partial)
            checkpoint.save(self.run.path / "last.pt", record | {"train_state": train_state})


class MidEpochClock:
    """When ``fit`` writes ``last.pt`` inside an epoch.

    Every ``train.checkpoint_steps`` batches of an epoch and/or when ``train.checkpoint_minutes``
    have passed since the last checkpoint (the clock restarts at every epoch's end too). Under
    torchrun every rank calls :meth:`due` at every step (rank 0's clock decides) and only rank 0
    writes.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, every_steps: int, every_s: float) -> None:
        self.every_steps, self.every_s = every_steps, every_s
        self.last = self.clock()

    @classmethod
    def for_run(cls, run: RunDir | None, tc: Any) -> MidEpochClock | None:
        """The clock ``tc`` (the train config) asks for, or None when there are no mid-epoch checkpoints."""
        every_steps = max(0, int(tc.checkpoint_steps or 0))
        every_s = max(0.0, float(tc.checkpoint_minutes or 0.0)) * 60
        if not (every_steps or every_s) or (run is None and not current_world().enabled):
            return None
        return cls(every_steps, every_s)

    def due(self, batches: int, total: int) -> bool:
        if batches >= total:  # the epoch's end is saved right after its evaluation
            return False
        if self.every_steps and batches % self.every_steps == 0:
            return True
        if not self.every_s:
            return False
        late = self.clock() - self.last >= self.every_s
        return rank0_decides(late) if current_world().enabled else late

    def saved(self) -> None:
        self.last = self.clock()


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a training step draws from, as tensors and numbers (``weights_only`` loads them)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Put back the generators :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "cuda" and "cuda" in st:  # a run moved from the GPU to the CPU has none to set
        torch.cuda.set_rng_state(st["cuda"], device)


def continue_epoch(partial: dict[str, Any], device: torch.device) -> EpochProgress:
    """The generators and the running sums of an epoch stopped after ``partial["batches"]`` batches."""
    set_rng_state(partial["rng"], device)
    begun = EpochProgress(partial["batches"], seconds=partial["seconds"])
    if current_world().main:  # the sums saved are over all ranks: one rank carries them on
        begun.loss_sum, begun.correct, begun.seen = partial["loss_sum"], partial["correct"], partial["seen"]
    return begun
