"""A moving average of the weights a fine-tuning stage trains: what it validates, saves and keeps.

Fine-tuning after a solved head first moves the body away from the features the head was fitted
to, and while the rate is high validation dips below the head stage before it climbs past it. An
exponential moving average of the weights, started at the head stage's weights, follows the same
path with a lag and without the step-to-step noise. Measured (bench/README.md, sections 4 and 11):
on clothing-small (MobileNetV2, `--budget 15m`, the last 3 groups over 17 epochs) the weights as
trained fell from the head stage's 87.1% to 84.5% at epoch 8, while their average never went
below 87.1%, and both ended at 90.6%; on the digits (30 epochs) the weights as trained fell 9.2
points, the average 0.8, and it ended 0.3 below them (96.4% against 96.7%).

The average spans a fraction of the stage (``StageConfig.average``): ``decay = 1 - 1 / (fraction *
steps)``, so a 3-epoch stage and a 30-epoch one both average over their last quarter or so.

While training the network holds the live weights and :class:`WeightAverage` the average;
:meth:`WeightAverage.swapped` puts the average in for validation and checkpoints. A checkpoint's
model is therefore the average (what was validated), and its ``train_state["average"]`` holds the
live weights, so that :meth:`WeightAverage.resume` continues exactly. At the stage's end
:meth:`WeightAverage.keep` leaves the average in the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of ``net``'s trainable parameters and floating-point buffers.

    Only what can change is averaged: the parameters that train in the stage (frozen ones never
    move) and the floating-point buffers (BatchNorm statistics, which move under ``bn: train``).
    """

    def __init__(self, net: nn.Module, fraction: float, steps: int) -> None:
        self.fraction = fraction
        self.live: dict[str, torch.Tensor] = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.live.update((n, b) for n, b in net.named_buffers() if b.is_floating_point())
        self.average = {n: t.detach().clone() for n, t in self.live.items()}
        self.decay = 0.0
        self.set_steps(steps)
        self.inside = False  # whether the network holds the average now (see swapped)

    def set_steps(self, steps: int) -> None:
        """The stage's length in steps (again after a ``--budget`` refit): the average spans ``fraction`` of it."""
        self.decay = 1.0 - 1.0 / max(1.0, self.fraction * steps)

    @torch.no_grad()
    def update(self) -> None:
        """One step: the average moves ``1 - decay`` of the way to the live weights."""
        names = list(self.live)
        torch._foreach_lerp_([self.average[n] for n in names], [self.live[n].detach() for n in names],
                             1.0 - self.decay)

    @torch.no_grad()
    def _swap(self) -> None:
        for n, t in self.live.items():
            held = t.detach().clone()
            t.detach().copy_(self.average[n])
            self.average[n].copy_(held)
        self.inside = not self.inside

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The network holds the average inside the block and the live weights again after it."""
        if self.inside:  # nested (a checkpoint written while validating): already in
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def keep(self) -> None:
        """At the stage's end: the network keeps the average (the live weights are dropped)."""
        if not self.inside:
            self._swap()

    def live_state(self) -> dict[str, torch.Tensor]:
        """The live weights, for ``last.pt`` (whose model, written inside :meth:`swapped`, is the average)."""
        held = self.average if self.inside else self.live
        return {n: t.detach().clone() for n, t in held.items()}

    @classmethod
    def resume(cls, net: nn.Module, fraction: float, steps: int, live: dict[str, Any]) -> WeightAverage:
        """Continue from a checkpoint: ``net`` holds the saved average, ``live`` the live weights."""
        avg = cls(net, fraction, steps)  # the average: the network's weights as loaded
        missing = set(avg.live) - set(live)
        if missing:
            raise ValueError(f"the checkpoint's live weights lack {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, t in avg.live.items():
                t.detach().copy_(live[n])
        return avg
