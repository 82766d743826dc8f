"""Training and evaluation: ``train_one_epoch``, ``evaluate``, ``fit``.

``fit`` runs the stages of the schedule (see :mod:`headstart.training.optim`) one after another. Each
epoch is seeded from the run's seed and its index, so a run on the CPU repeats exactly and a run
resumed from its last checkpoint continues exactly as if it had never stopped.

``last.pt`` is written after every epoch and, with ``train.checkpoint_minutes`` /
``train.checkpoint_steps``, inside epochs too: then it also holds the batches already trained in
the current epoch, that epoch's running metric sums and the random number generators' states.
A resumed run rebuilds the epoch's seeded order, skips those batches without loading their images
and carries on. Augmentation does not depend on which loader worker runs it or on what was
skipped: every draw of an epoch seeds its own transform from the epoch's seed and its position
in the epoch's order (:class:`_SeededItems`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler, get_worker_info

from headstart.config import RunConfig, StageConfig, to_dict
from headstart.data.core import DataBundle, make_loader
from headstart.errors import HeadstartError
from headstart.evaluation.inference import evaluate
from headstart.evaluation.metrics import ClassReport
from headstart.models import checkpoint
from headstart.models.freeze import count_params, trainable_state
from headstart.models.network import Network
from headstart.progress import Progress
from headstart.runtime.device import pick_device, seed_everything, set_cpu_speed_flags
from headstart.runtime.distributed import (
    ShardSampler,
    all_sum,
    barrier,
    ddp_forward,
    init_from_env,
    local_device,
    per_rank_batch,
    rank0_decides,
)
from headstart.runtime.distributed import world as current_world
from headstart.runtime.precision import Precision, resolve_precision
from headstart.training.optim import apply_stage, build_optimizer, build_scheduler, resolve_stages
from headstart.training.runs import RunDir

log = logging.getLogger(__name__)
AUX_WEIGHT = 0.4  # Inception's own recipe for its auxiliary classifiers


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


@dataclass
class FitResult:
    best_accuracy: float
    final: ClassReport | None
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    seconds: float = 0.0


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
) -> EpochStats:
    """One pass over ``loader``, stepping the optimizer and the per-step schedule.

    ``forward`` maps a batch to (logits, aux logits); the default runs the whole network, the
    feature cache passes one that runs only the head on stored features. ``precision`` sets
    autocast (and the fp16 gradient scaler); ``mix`` is MixUp/CutMix on the batch, whose labels
    then become class probabilities (accuracy is counted against their argmax).

    ``start`` continues an epoch cut short (``loader`` then holds only its remaining batches):
    its sums go on accumulating exactly as if the epoch had never stopped. ``on_batch`` is called
    after every step with the epoch's progress so far (``fit`` writes mid-epoch checkpoints there).
    """
    forward = forward or net.forward_train
    precision = precision or Precision(None, None, device.type)
    net.train()
    p = dataclasses.replace(start) if start is not None else EpochProgress()
    total_loss, correct, seen = p.loss_sum, p.correct, p.seen
    began = time.perf_counter() - p.seconds
    bar = Progress(loader, len(loader), desc, enabled=progress)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if mix is not None:
            x, y = mix(x, y)
        with precision.autocast():
            logits, aux = forward(x)
            loss = loss_fn(logits.float(), y)
            for a in aux:
                loss = loss + AUX_WEIGHT * loss_fn(a.float(), y)
        opt.zero_grad(set_to_none=True)
        _backward_step(loss, opt, precision, on_step)
        step_loss = float(loss.detach())  # one device sync per step
        if after_step is not None:
            after_step(step_loss, opt)  # before the schedule moves: the rate just used
        sched.step()
        n = y.shape[0]
        total_loss += step_loss * n
        hard = y.argmax(1) if y.ndim == 2 else y
        correct += int((logits.detach().argmax(1) == hard).sum())
        seen += n
        bar.update(n, loss=total_loss / seen, acc=correct / seen)
        if on_batch is not None:
            p.batches += 1
            p.loss_sum, p.correct, p.seen, p.seconds = total_loss, correct, seen, time.perf_counter() - began
            on_batch(p)
    total_loss, correct, seen = all_sum(total_loss, correct, seen)  # over all ranks under torchrun
    return EpochStats(total_loss / max(1, seen), correct / max(1, seen), int(seen), time.perf_counter() - began)


def _backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, precision: Precision,
                   on_step: Callable[[torch.optim.Optimizer], None] | None) -> None:
    scaler = precision.scaler
    if scaler is None:
        loss.backward()
        if on_step is not None:
            on_step(opt)
        opt.step()
        return
    scaler.scale(loss).backward()
    if on_step is not None:
        on_step(opt)
    scaler.step(opt)
    scaler.update()


# ---------------------------------------------------------------------- fit


_MASK64 = 2**64 - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit number from any integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def item_seed(epoch_seed: int, position: int) -> int:
    """The seed of the ``position``-th draw of the epoch seeded ``epoch_seed``."""
    return _mix64(_mix64(epoch_seed & _MASK64) + position)


class _Draw(int):
    """A dataset index that also carries its position in the epoch's order of draws."""

    pos: int

    def __new__(cls, index: int, pos: int) -> "_Draw":
        self = super().__new__(cls, index)
        self.pos = pos
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # sent to loader workers
        return (_Draw, (int(self), self.pos))


class _DrawPositions(Sampler[int]):
    """``base``'s indices, each tagged with its position in the epoch (:class:`_Draw`)."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base

    def __iter__(self) -> Any:
        return (_Draw(i, pos) for pos, i in enumerate(self.base))

    def __len__(self) -> int:
        return len(self.base)


class _SkipSampler(Sampler[int]):
    """``base`` without its first ``skip`` indices: batches already trained are never loaded."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class _SeededItems(Dataset):
    """A training dataset whose random transform is seeded per draw.

    Draw ``pos`` of an epoch seeds torch's CPU generator, ``random`` and numpy from
    ``item_seed(epoch_seed, pos)`` before its item is loaded, so its augmentation does not depend
    on which loader worker loads it, on how many workers there are, or on batches skipped when a
    run resumes mid-epoch. Seeding by position rather than by image keeps a repeated draw (the
    balanced sampler draws with replacement) from repeating its augmentation too; the padding
    torchrun adds to even out the ranks' shares does repeat it. In the main process (no workers)
    torch's CPU generator is put back afterwards, so the training loop's own draws (dropout,
    MixUp) are the same with and without workers; ``random`` and numpy are left as the last item
    seeded them (nothing in the loop draws from them, and saving and restoring numpy's state
    would add about 80 us an item, measured against 13 us for all of this seeding).
    """

    def __init__(self, dataset: Any, epoch_seed: int) -> None:
        self.dataset, self.epoch_seed = dataset, epoch_seed

    @property
    def targets(self) -> Any:
        return self.dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        seed = item_seed(self.epoch_seed, getattr(i, "pos", int(i)))
        if get_worker_info() is not None:  # a worker's generators serve only its items
            _seed_item(seed)
            return self.dataset[int(i)]
        saved = torch.random.default_generator.get_state()
        try:
            _seed_item(seed)
            return self.dataset[int(i)]
        finally:
            torch.random.default_generator.set_state(saved)


def _seed_item(seed: int) -> None:
    # The CPU generator only (torch.manual_seed would reseed every CUDA device too): transforms
    # run on the CPU, and the training loop's CUDA draws must not move.
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_loader(dataset: Any, cfg: RunConfig, epoch_seed: int, workers: int | None,
                  skip_batches: int = 0) -> DataLoader:
    """The loader of one training epoch; ``skip_batches`` leaves out its first batches.

    The order of each epoch comes from its own generator, so epoch k's batches are the same
    whether the run started at epoch 0 or resumed at epoch k (or inside it).
    """
    gen = torch.Generator().manual_seed(epoch_seed)
    if cfg.data.balanced:
        # Each image is drawn with probability inverse to its class's size: classes are seen
        # equally often, and an epoch still has as many draws as there are images.
        counts = np.bincount(np.asarray(dataset.targets))
        weights = torch.as_tensor(1.0 / counts[np.asarray(dataset.targets)], dtype=torch.double)
        sampler: Any = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=gen)
    else:
        sampler = RandomSampler(dataset, generator=gen)
    if cfg.data.augment and getattr(dataset, "transform", None) is not None:
        # Images with a random transform (stored features have none): seeded per draw.
        dataset, sampler = _SeededItems(dataset, epoch_seed), _DrawPositions(sampler)
    w = current_world()
    if w.enabled:  # every rank draws the same permutation and takes its share of it
        sampler = ShardSampler(sampler, w)
    batch = per_rank_batch(cfg.data.batch_size)
    if skip_batches:  # after the rank's share: batches of this rank are skipped
        sampler = _SkipSampler(sampler, skip_batches * batch)
    return make_loader(dataset, batch_size=batch, shuffle=False, workers=workers,
                       seed=epoch_seed, sampler=sampler, drop_last=len(dataset) > cfg.data.batch_size)


class StageInputs:
    """What a stage trains and validates on: images through the whole network, or cached tensors.

    While the whole body is frozen (and no auxiliary head trains) the body is a fixed function:
    its features are computed once per view instead of once per epoch, and only the head trains
    (``part = "body"``). While only the last depth groups train, the frozen first part of the
    body's step chain is cached the same way and the stage runs the rest of the body and the head
    on its stored output (``part = "prefix:K"``, K steps). Otherwise images go through everything.
    """

    def __init__(self, net: Network, data: DataBundle, cfg: RunConfig, device: torch.device,
                 say: Callable[[str], None]) -> None:
        self.net, self.data, self.cfg, self.device = net, data, cfg, device
        tc = cfg.train
        self.precision = resolve_precision(tc.precision, device)
        self.channels_last = tc.channels_last if tc.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        self.cut = 0  # chain steps whose output is cached (prefix part only)
        self.part = self._choose_part(say)
        self.cached = self.part is not None
        self.views: dict[int, Any] = {}
        self.body_fp = ""
        self.setup_seconds = 0.0  # feature extraction, counted in the stage's time
        self.data_fps: dict[int, str] = {}
        if self.cached:
            from headstart.training.cache import body_fingerprint, cache_root

            self.body_fp = body_fingerprint(net) if self.part == "body" else net.prefix_fingerprint(self.cut)
            self.root = cache_root(cfg.cache.dir)
            start = time.perf_counter()
            self.val = self._features(data.val, 0, "val")
            self.train_view(0)
            self.setup_seconds = time.perf_counter() - start
            what = ("the frozen body runs once, not every epoch" if self.part == "body" else
                    f"the frozen first {self.cut} of {len(net.chain or [])} body steps (up to "
                    f"{self._cut_name()}) run once, not every epoch")
            say(f"   features cached in {self.setup_seconds:.1f}s: {what} ({self.root})")
            self.workers: int | None = 0
        else:
            self.val, self.workers = data.val, cfg.data.workers

    def _choose_part(self, say: Callable[[str], None]) -> str | None:
        from headstart.training.cache import cacheable_part

        net, cfg = self.net, self.cfg
        part, cut = cacheable_part(net, cfg.cache)
        if part != "prefix":
            return part
        if cfg.train.mixup or cfg.train.cutmix:
            say("   frozen first part not cached: mixup/cutmix mix images, not feature maps")
            return None
        # Early feature maps can be far larger than the images: check the space first.
        # One image through the loader: in-memory photos are only transformed there, per batch.
        x = next(iter(make_loader(self.data.val, batch_size=1, shuffle=False, workers=0, seed=0)))[0]
        x = x.to(self.device)
        with torch.inference_mode(), self.precision.autocast():
            per_image = net.eval().run_steps(x, 0, cut).numel() * 4
        views = (cfg.cache.views if cfg.data.augment else 1) + 1
        need = per_image * (len(self.data.train) * (views - 1) + len(self.data.val))
        if need > cfg.cache.max_gb * 2**30:
            say(f"   frozen first part not cached: its output would take {need / 2**30:.1f} GB "
                f"(cache.max_gb is {cfg.cache.max_gb:g}); the whole network runs every epoch")
            return None
        self.cut = cut
        return f"prefix:{cut}"

    def _cut_name(self) -> str:
        return self.net.chain[self.cut - 1].name if self.net.chain and self.cut else "-"

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_steps(x, 0, self.cut)

    def _features(self, ds: Any, view: int, split: str) -> Any:
        # Under torchrun rank 0 extracts; the others wait, then read the same complete entry.
        if not current_world().main:
            barrier()
        out = self._extract(ds, view, split)
        if current_world().main:
            barrier()
        return out

    def _extract(self, ds: Any, view: int, split: str) -> Any:
        from headstart.training.cache import cached_features, dataset_fingerprint

        if id(ds) not in self.data_fps:  # once per dataset and stage, not once per view
            self.data_fps[id(ds)] = dataset_fingerprint(ds)
        what = "features" if self.part == "body" else f"features up to {self._cut_name()}"
        return cached_features(self.net, ds, body_fp=self.body_fp, kind=self.data.kind, view=view,
                               seed=self.cfg.train.seed, root=self.root, batch_size=self.cfg.data.batch_size * 2,
                               device=self.device, progress=self.cfg.train.progress,
                               desc=f"{what} {split}" + (f" view {view}" if split == "train" else ""),
                               precision=self.precision, policy=self.cfg.data.auto_augment,
                               data_fp=self.data_fps[id(ds)], part=self.part or "body",
                               run=self._prefix if self.part != "body" else None)

    def train_view(self, epoch: int) -> Any:
        if not self.cached:
            return self.data.train
        # Augmented views only when augmentation is on: --no-augment means plain features only.
        views = self.cfg.cache.views if self.cfg.data.augment else 1
        view = epoch % max(1, views)
        if view not in self.views:
            self.views[view] = self._features(self.data.train, view, "train")
        return self.views[view]

    def forward(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None:
        if not hasattr(self, "_forward"):
            self._forward = self._build_forward()
        return self._forward

    def _build_forward(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None:
        if self.part == "body":
            fn, owner = (lambda f: (self.net.head(f), [])), self.net.head
        elif self.part is not None:
            suffix = _FromCut(self.net, self.cut)
            fn, owner = (lambda a: (suffix(a), [])), self.net
            if self.cfg.train.compile:
                fn = torch.compile(fn)
        elif self.cfg.train.compile:
            # Compiling the bound method keeps the module tree (and state_dict keys) as they are.
            fn, owner = torch.compile(self.net.forward_train), self.net
        else:
            fn, owner = self.net.forward_train, self.net
        if current_world().enabled:
            return ddp_forward(fn, owner, self.device, find_unused=bool(self.net.aux))
        return None if fn == self.net.forward_train else fn

    def mix(self) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """MixUp and/or CutMix on image batches (one of them per batch when both are on)."""
        tc = self.cfg.train
        if self.cached or not (tc.mixup or tc.cutmix):
            return None
        from torchvision.transforms import v2

        n = len(self.data.classes)
        ops = ([v2.MixUp(alpha=tc.mixup, num_classes=n)] if tc.mixup else []) + (
            [v2.CutMix(alpha=tc.cutmix, num_classes=n)] if tc.cutmix else [])
        op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        return lambda x, y: op(x, y)

    def eval_model(self) -> nn.Module:
        if self.part == "body":
            return self.net.head
        return _FromCut(self.net, self.cut) if self.part is not None else self.net

    def val_loader(self) -> DataLoader:
        return make_loader(self.val, batch_size=self.cfg.data.batch_size * 2, shuffle=False,
                           workers=self.workers, seed=self.cfg.train.seed)


class _FromCut(nn.Module):
    """The network from chain step ``cut`` on: the rest of the body, then the head."""

    def __init__(self, net: Network, cut: int) -> None:
        super().__init__()
        self.net, self.cut = net, cut

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.run_steps(a, self.cut))


def _group_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in opt.param_groups:
        out.setdefault(g.get("name", "?"), g["lr"])
    return out


def fit(
    net: Network,
    data: DataBundle,
    cfg: RunConfig,
    run: RunDir | None = None,
    *,
    resume: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> FitResult:
    """Train ``net`` on ``data`` through every stage of ``cfg.train``'s schedule.

    With ``run`` the resolved config, per-epoch metrics and checkpoints (``best.pt`` by validation
    accuracy, ``last.pt`` with the full training state) are written to the run folder. ``resume``
    is a ``last.pt`` checkpoint to continue from, mid-schedule.
    """
    tc = cfg.train
    w = init_from_env(tc.device)
    device = pick_device(local_device(tc.device))
    if not w.main:  # only rank 0 talks and writes
        say, run = (lambda _: None), None
        cfg = _quiet_copy(cfg)
    set_cpu_speed_flags()
    net.to(device)
    stages = resolve_stages(tc, net)
    loss_fn = _loss(tc, data, device)
    state = _initial_state(resume)
    final: ClassReport | None = None
    start = time.perf_counter() - state["seconds"]
    saver = _MidEpoch.for_run(run, tc, start)
    if resume is not None and state["stage"] < len(stages) and (
        state["stopped"] or state["epoch"] >= stages[state["stage"]].epochs
    ):
        _next_stage(state, state["stage"])  # it was saved after its stage's last epoch
    for si, stage in enumerate(stages):
        if si < state["stage"]:
            continue
        if stage.lr == "auto":
            stage = _auto_lr(net, data, cfg, stage, run, say, state)
        apply_stage(net, stage)
        _announce_stage(net, stage, si, len(stages), say)
        inputs = StageInputs(net, data, cfg, device, say)
        opt = build_optimizer(net, stage, tc)
        steps = len(_epoch_loader(data.train, cfg, 0, 0))
        sched = build_scheduler(opt, steps * stage.epochs, tc)
        if state["optimizer"] is not None:  # resuming mid-stage
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler = inputs.precision.scaler
            if scaler is not None and state.get("scaler"):  # the fp16 loss scale it had reached
                scaler.load_state_dict(state["scaler"])
        if state.get("partial"):
            say(f"   continuing epoch {state['epoch'] + 1}/{stage.epochs} after its first "
                f"{state['partial']['batches']} batches")
        for epoch in range(state["epoch"], stage.epochs):
            row, final = _run_epoch(net, data, cfg, stage, si, epoch, opt, sched, loss_fn, inputs, device, state,
                                    run, saver)
            state["history"].append(row)
            state["seconds"] = time.perf_counter() - start
            say(_epoch_line(row, stage))
            _track_best(state, row, tc.patience)
            if run is not None:
                _save_epoch(run, net, data, cfg, state, si, epoch + 1, opt, sched, row, inputs.precision)
            if saver is not None:
                saver.saved()
            if state["stopped"]:
                say(f"   early stop: no improvement for {tc.patience} epoch(s)")
                break
        _next_stage(state, si)
    if final is None:  # nothing trained (a resumed, finished run): evaluate once
        final = evaluate(net, make_loader(data.val, batch_size=cfg.data.batch_size * 2, shuffle=False,
                                          workers=cfg.data.workers, seed=tc.seed), data.classes, device)
    return FitResult(state["best"], final, state["history"], run.path if run else None, time.perf_counter() - start)


def _auto_lr(net: Network, data: DataBundle, cfg: RunConfig, stage: StageConfig, run: RunDir | None,
             say: Callable[[str], None], state: dict[str, Any]) -> StageConfig:
    """The stage with its rate set by the learning-rate range test (plot saved in the run folder).

    Resuming mid-stage reuses the rate chosen when the stage began (recorded in the history).
    """
    from headstart.training.lr_find import lr_find

    if state["optimizer"] is not None:
        partial = state.get("partial") or {}
        if isinstance(partial.get("base_lr"), float):  # stopped inside the stage's first epoch
            return dataclasses.replace(stage, lr=partial["base_lr"])
        chosen = [r["base_lr"] for r in state["history"] if r.get("stage") == stage.name and "base_lr" in r]
        if chosen:
            return dataclasses.replace(stage, lr=chosen[-1])
    if current_world().enabled:
        raise HeadstartError("lr: auto is not supported under torchrun (each rank would test its own shard); "
                             "run `headstart lr-find` in one process and pass the rate it suggests")
    result = lr_find(net, data, cfg, stage, say=lambda _: None)
    if run is not None:
        plot = result.save_plot(run.path / f"lr_find-{stage.name}.png")
        shutil.copyfile(plot, run.path / "lr_find.png")  # the report shows the latest one
    say(f"   learning-rate range test for stage {stage.name}: suggested lr {result.suggestion:.3g}")
    return dataclasses.replace(stage, lr=result.suggestion)


def _loss(tc: Any, data: DataBundle, device: torch.device) -> nn.Module:
    weight = None
    if tc.class_weights:
        # Inverse class frequency, scaled so a balanced dataset gets weights of 1.
        counts = torch.bincount(torch.as_tensor(data.train.targets), minlength=len(data.classes)).double()
        weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).float().to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=tc.label_smoothing)


def _quiet_copy(cfg: RunConfig) -> RunConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.progress = False
    return cfg


def _next_stage(state: dict[str, Any], si: int) -> None:
    state.update(stage=si + 1, epoch=0, optimizer=None, scheduler=None, scaler=None, stopped=False, bad_epochs=0,
                 stage_best=-1.0)
    state.pop("partial", None)


def _initial_state(resume: dict[str, Any] | None) -> dict[str, Any]:
    if resume is None:
        return {"stage": 0, "epoch": 0, "optimizer": None, "scheduler": None, "scaler": None, "best": -1.0,
                "bad_epochs": 0, "stopped": False, "history": [], "seconds": 0.0, "global_epoch": 0}
    ts = dict(resume["train_state"])
    ts["history"] = list(ts["history"])
    return ts


def _run_epoch(net, data, cfg, stage, si, epoch, opt, sched, loss_fn, inputs, device, state, run=None,
               saver: _MidEpoch | None = None) -> tuple[dict[str, Any], ClassReport]:
    tc = cfg.train
    epoch_seed = tc.seed * 100_003 + state["global_epoch"]
    partial = state.pop("partial", None)  # this epoch was stopped after some of its batches
    train_set = inputs.train_view(epoch)  # may extract an augmented view: before seeding
    seed_everything(epoch_seed)  # augmentation and dropout draws of this epoch
    loader = _epoch_loader(train_set, cfg, epoch_seed, inputs.workers, partial["batches"] if partial else 0)
    total_batches = len(loader) + (partial["batches"] if partial else 0)
    lrs = _group_lrs(opt) if partial is None else dict(partial["lrs"])  # the rates the epoch began with
    begun = None
    if partial is not None:
        _set_rng_state(partial["rng"], device)
        begun = EpochProgress(partial["batches"], seconds=partial["seconds"])
        if current_world().main:  # the sums saved are over all ranks: one rank carries them on
            begun.loss_sum, begun.correct, begun.seen = partial["loss_sum"], partial["correct"], partial["seen"]
    desc = f"{stage.name} {epoch + 1}/{stage.epochs}"
    state.setdefault("step", 0)

    def after_step(loss: float, o: torch.optim.Optimizer) -> None:
        state["step"] += 1
        if run is not None:
            run.tb_step(state["step"], loss, _group_lrs(o))

    def on_batch(p: EpochProgress) -> None:
        if saver is None or not saver.due(p.batches, total_batches):
            return
        loss_sum, correct, seen = all_sum(p.loss_sum, p.correct, p.seen)  # all ranks take part
        if run is not None:
            saver.save(run, net, data, cfg, state, si, epoch, opt, sched, inputs.precision, {
                "batches": p.batches, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen),
                "seconds": p.seconds, "lrs": lrs, "base_lr": stage.lr, "rng": _rng_state(device)})
        saver.saved()

    tr = train_one_epoch(net, loader, opt, sched, loss_fn, device, tc.progress, desc, forward=inputs.forward(),
                         precision=inputs.precision, mix=inputs.mix(), channels_last=inputs.channels_last,
                         after_step=after_step, start=begun, on_batch=on_batch if saver is not None else None)
    report = evaluate(inputs.eval_model(), inputs.val_loader(), data.classes, device)
    state["global_epoch"] += 1
    setup, inputs.setup_seconds = inputs.setup_seconds, 0.0  # reported once, with the stage's first epoch
    return {
        "stage": stage.name, "stage_index": si, "epoch": epoch + 1, "global_epoch": state["global_epoch"],
        "setup_seconds": setup, "base_lr": stage.lr,
        "train_loss": tr.loss, "train_acc": tr.accuracy, "val_loss": report.loss, "val_acc": report.top1,
        "val_top5": report.top5, "seconds": tr.seconds, "images_per_s": tr.images_per_s, "lrs": lrs,
    }, report


def _track_best(state: dict[str, Any], row: dict[str, Any], patience: int | None) -> None:
    """Best accuracy of the run (for best.pt) and of the stage (for early stopping).

    Patience counts epochs without improvement *within the stage*: fine-tuning often dips before
    it beats the head stage, and must not be stopped for that.
    """
    row["best"] = row["val_acc"] > state["best"]
    if row["best"]:
        state["best"] = row["val_acc"]
    if row["val_acc"] > state.get("stage_best", -1.0):
        state["stage_best"], state["bad_epochs"] = row["val_acc"], 0
    else:
        state["bad_epochs"] += 1
    stop = patience is not None and state["bad_epochs"] >= patience
    state["stopped"] = rank0_decides(stop)  # under torchrun all ranks must leave the stage together


def _train_state(state, si, epoch, opt, sched, precision: Precision) -> dict[str, Any]:
    train_state = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "partial")}
    scaler = precision.scaler.state_dict() if precision.scaler is not None else None
    train_state.update(stage=si, epoch=epoch, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                       scaler=scaler or None)
    return train_state


def _save_epoch(run: RunDir, net, data, cfg, state, si, epoch, opt, sched, row, precision: Precision) -> None:
    run.log_epoch(row)
    run.tb_epoch(row)
    record = checkpoint.model_record(net, data.classes, data.kind) | {"config": to_dict(cfg), "metrics": row}
    if row["best"]:
        checkpoint.save(run.path / "best.pt", record)
    train_state = _train_state(state, si, epoch, opt, sched, precision)
    checkpoint.save(run.path / "last.pt", record | {"train_state": train_state})


class _MidEpoch:
    """When ``fit`` writes ``last.pt`` inside an epoch, and what it writes then.

    Every ``train.checkpoint_steps`` batches of an epoch and/or when ``train.checkpoint_minutes``
    have passed since the last checkpoint (the clock restarts at every epoch's end too). Under
    torchrun every rank calls :meth:`due` at every step (rank 0's clock decides) and only rank 0
    writes.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, every_steps: int, every_s: float, start: float) -> None:
        self.every_steps, self.every_s, self.start = every_steps, every_s, start
        self.last = self.clock()

    @classmethod
    def for_run(cls, run: RunDir | None, tc: Any, start: float) -> _MidEpoch | None:
        every_steps = max(0, int(tc.checkpoint_steps or 0))
        every_s = max(0.0, float(tc.checkpoint_minutes or 0.0)) * 60
        if not (every_steps or every_s) or (run is None and not current_world().enabled):
            return None
        return cls(every_steps, every_s, start)

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

    def save(self, run: RunDir, net, data, cfg, state, si, epoch, opt, sched, precision: Precision,
             partial: dict[str, Any]) -> None:
        history = state["history"]
        record = checkpoint.model_record(net, data.classes, data.kind) | {
            "config": to_dict(cfg), "metrics": history[-1] if history else {}}
        train_state = _train_state(state, si, epoch, opt, sched, precision)
        train_state.update(seconds=time.perf_counter() - self.start, partial=partial)
        checkpoint.save(run.path / "last.pt", record | {"train_state": train_state})


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "cuda" and "cuda" in st:  # a run moved from the GPU to the CPU has none to set
        torch.cuda.set_rng_state(st["cuda"], device)


def _announce_stage(net: Network, stage: StageConfig, si: int, n: int, say: Callable[[str], None]) -> None:
    total, trainable = count_params(net)
    states = trainable_state(net)
    frozen = [g for g, s in states.items() if s == "frozen"]
    live = [g for g, s in states.items() if s != "frozen"]
    what = "freeze the body, train the classifier" if stage.freeze == "body" else "unfreeze and fine-tune"
    say(f"\n== stage {si + 1}/{n}: {stage.name} ({what}) — {stage.epochs} epoch(s), lr {stage.lr}, "
        f"BatchNorm {stage.bn}")
    say(f"   frozen: {', '.join(frozen) or 'nothing'}")
    say(f"   training: {', '.join(live)}  ({trainable:,} of {total:,} parameters)")


def _epoch_line(row: dict[str, Any], stage: StageConfig) -> str:
    mark = "  *best*" if row.get("best") else ""
    return (f"   epoch {row['epoch']}/{stage.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  ({row['images_per_s']:.0f} img/s){mark}")
