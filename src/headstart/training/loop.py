"""One training epoch: ``train_one_epoch``, the backward step, the loss, and the epoch's statistics.

The loop stops a run that diverged instead of training on: a training loss that is not finite,
or (under fp16) a gradient scaler that keeps skipping steps because the gradients overflow,
raises :class:`Diverged`, which names the step; :func:`headstart.training.fit.fit` adds the
stage and epoch and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart.config import StageConfig
from headstart.data import DataBundle
from headstart.errors import HeadstartError
from headstart.models.network import Network
from headstart.progress import Progress
from headstart.runtime.chunks import batch_statistics, spans, train_chunk_size
from headstart.runtime.distributed import all_sum
from headstart.runtime.precision import Precision
from headstart.training.optim import lr_flag, stage_lr

AUX_WEIGHT = 0.4  # Inception's own recipe for its auxiliary classifiers
# Below a loss scale of 1 the fp16 scaler is shrinking the gradients to fit them into fp16 at all:
# they overflow even unscaled. Started at torch's 2**16, that takes 17 skipped steps in a row.
MIN_LOSS_SCALE = 1.0


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, self.seconds)


@dataclass
class EpochProgress:
    """Where an epoch stands: batches done and the running sums of its training metrics.

    ``seconds`` is the epoch's training time so far. A mid-epoch checkpoint stores it, and
    :func:`train_one_epoch` continues from it.
    """

    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


class Diverged(HeadstartError):
    """Training stopped because it diverged; ``batch`` is the epoch's step it was seen at (1-based).

    ``reason`` says what was seen (a loss of nan, weights that are not finite, steps skipped);
    ``message``, when given, is the whole line the user sees (``fit`` adds where and what to do).
    """

    def __init__(self, reason: str, batch: int | None = None, *, message: str | None = None) -> None:
        super().__init__(message or (reason if batch is None else f"step {batch}: {reason}"))
        self.reason, self.batch = reason, batch


def diverged_text(tc: Any, folder: Path | None, index: int, stage: StageConfig, epoch: int, e: Diverged,
                  first_step: int) -> str:
    """One line: where training diverged (stage ``index``, 0-based), what was seen, what to do, and what the
    run ``folder`` still holds."""
    where = f"stage {index + 1} ({stage.name}), epoch {epoch + 1}/{stage.epochs}"
    if e.batch is not None:
        where += f", step {e.batch} (step {first_step + e.batch} of the run)"
    lr = stage_lr(stage, tc)
    text = (f"training diverged in {where}: {e.reason}; the learning rate {lr:.3g} is likely too high: "
            f"lower {lr_flag(tc, stage)} or run `headstart lr-find --stage {index + 1}`")
    if folder is None:
        return text
    if (folder / "last.pt").exists():
        return text + f"; nothing non-finite was saved: {folder / 'last.pt'} holds the last finite state"
    return text + "; no checkpoint was written"


def weights_finite(net: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``net`` is finite (one device sync)."""
    checks = [torch.isfinite(t).all() for t in net.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def build_loss(tc: Any, data: DataBundle, device: torch.device) -> nn.Module:
    """Cross-entropy with ``train.label_smoothing`` and, with ``train.class_weights``, inverse-frequency weights."""
    weight = inverse_frequency(data.train.targets, len(data.classes)).to(device) if tc.class_weights else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=tc.label_smoothing)


def inverse_frequency(targets: Any, classes: int) -> torch.Tensor:
    """Per-class weights of inverse frequency, scaled so that a balanced dataset gets weights of 1."""
    counts = torch.bincount(torch.as_tensor(list(targets)), minlength=classes).double()
    return (counts.sum() / (len(counts) * counts.clamp(min=1))).float()


def optimizer_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each named parameter group (a group's decay and no-decay halves share one)."""
    out: dict[str, float] = {}
    for g in opt.param_groups:
        out.setdefault(g.get("name", "?"), g["lr"])
    return out


def train_one_epoch(
    net: Network,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[torch.optim.Optimizer], None] | None = None,
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
    precision: Precision | None = None,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    channels_last: bool = False,
    after_step: Callable[[float, torch.optim.Optimizer], None] | None = None,
    start: EpochProgress | None = None,
    on_batch: Callable[[EpochProgress], None] | None = None,
    micro_batch: int | None = None,
) -> EpochStats:
    """One pass over ``loader``, stepping the optimizer and the per-step schedule.

    ``forward`` maps a batch to (logits, aux logits); the default runs the whole network, the
    feature cache passes one that runs only the head on stored features. ``precision`` sets
    autocast (and the fp16 gradient scaler); ``mix`` is MixUp/CutMix on the batch, whose labels
    then become class probabilities (accuracy is counted against their argmax).

    ``start`` continues an epoch cut short (``loader`` then holds only its remaining batches):
    its sums go on accumulating exactly as if the epoch had never stopped. ``on_batch`` is called
    after every step with the epoch's progress so far (``fit`` writes mid-epoch checkpoints there).
    ``micro_batch`` runs each batch that many images at a time, adding up the gradients for one
    step (None: auto, see :mod:`headstart.runtime.chunks`).
    Raises :class:`Diverged` on a loss that is not finite, before the rate moves on.
    """
    # long function: the per-batch loop reads top to bottom (move, forward, loss, step, sums,
    # mid-epoch checkpoint); pieces split out would each need most of its 17 arguments.
    forward = forward or net.forward_train
    precision = precision or Precision(None, None, device.type)
    net.train()
    p = dataclasses.replace(start) if start is not None else EpochProgress()
    total_loss, correct, seen, batch = p.loss_sum, p.correct, p.seen, p.batches
    began = time.perf_counter() - p.seconds
    skips = _SkippedSteps(precision.scaler)
    updating_bn = batch_statistics(net)  # once per epoch: the modes are set by net.train() above
    bar = Progress(loader, len(loader), desc, enabled=progress)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if mix is not None:
            x, y = mix(x, y)
        batch += 1
        opt.zero_grad(set_to_none=True)
        size = train_chunk_size(x, device, micro_batch, updating_bn)
        step_loss, right = 0.0, 0
        for i, (part, share) in enumerate(chunk_shares(loss_fn, y, size)):
            with precision.autocast():
                logits, aux = forward(x[part])
                loss = loss_fn(logits.float(), y[part])
                for a in aux:
                    loss = loss + AUX_WEIGHT * loss_fn(a.float(), y[part])
            if i == 0:
                skips.check(batch - 1)  # the previous step's, once this step's forward is queued
            _backward(loss * share if share != 1 else loss, precision)
            step_loss += float(loss.detach()) * share  # one device sync per chunk
            hard = y[part].argmax(1) if y.ndim == 2 else y[part]
            right += int((logits.detach().argmax(1) == hard).sum())
        _step(opt, precision, on_step)
        if not math.isfinite(step_loss):
            raise Diverged(f"the training loss is {step_loss}", batch)
        if after_step is not None:
            after_step(step_loss, opt)  # before the schedule moves: the rate just used
        sched.step()
        n = y.shape[0]
        total_loss += step_loss * n
        correct += right
        seen += n
        bar.update(n, loss=total_loss / seen, acc=correct / seen)
        if on_batch is not None:
            p.batches = batch
            p.loss_sum, p.correct, p.seen, p.seconds = total_loss, correct, seen, time.perf_counter() - began
            on_batch(p)
    skips.check(batch)
    total_loss, correct, seen = all_sum(total_loss, correct, seen)  # over all ranks under torchrun
    return EpochStats(total_loss / max(1, seen), correct / max(1, seen), int(seen), time.perf_counter() - began)


def chunk_shares(loss_fn: nn.Module, y: torch.Tensor, size: int) -> list[tuple[slice, float]]:
    """The batch's chunks of ``size`` and each one's share of the batch's loss.

    The shares weight the chunks' mean losses so that they add up to the whole batch's mean loss
    (and their gradients to its gradient): a chunk's count over the batch's, or, for a loss with
    class weights on hard labels, its summed weights over the batch's (PyTorch's weighted mean).
    """
    n = y.shape[0]
    parts = spans(n, size)
    if len(parts) == 1:
        return [(parts[0], 1.0)]
    weight = getattr(loss_fn, "weight", None)
    if weight is not None and y.ndim == 1:
        w = weight[y]
        total = float(w.sum())
        return [(p, float(w[p].sum()) / total) for p in parts]
    return [(p, (p.stop - p.start) / n) for p in parts]


def _backward(loss: torch.Tensor, precision: Precision) -> None:
    if precision.scaler is None:
        loss.backward()
    else:
        precision.scaler.scale(loss).backward()


def _step(opt: torch.optim.Optimizer, precision: Precision,
          on_step: Callable[[torch.optim.Optimizer], None] | None) -> None:
    scaler = precision.scaler
    if on_step is not None:
        on_step(opt)
    if scaler is None:
        opt.step()
        return
    scaler.step(opt)
    scaler.update()


class _SkippedSteps:
    """The steps the fp16 gradient scaler skipped in a row, and the stop once its scale fell below 1.

    A skipped step lowers the scale (found inf: times the backoff factor), so comparing the scale
    after each step with the one before tells a skip, with nothing but public API. Reading the
    scale syncs with the device: it is read one step late, once the next step's forward is
    queued, so the device keeps working while the host waits.
    """

    def __init__(self, scaler: Any | None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.scale = self.scaler.get_scale() if self.scaler is not None else 0.0
        self.skipped = 0

    def check(self, batch: int) -> None:
        """Look at step ``batch``'s scale update (nothing before the first step)."""
        if self.scaler is None or batch == 0:
            return
        scale = self.scaler.get_scale()
        self.skipped = self.skipped + 1 if scale < self.scale else 0
        self.scale = scale
        if self.skipped and scale < MIN_LOSS_SCALE:
            raise Diverged(f"the fp16 gradient scaler skipped the last {self.skipped} step(s): the gradients "
                           f"overflow even at loss scale {scale:.3g}", batch)
