"""What a stage trains and validates on: images through the whole network, or cached tensors.

:class:`StageInputs` decides, per stage, whether the frozen body (or the frozen first part of
its step chain) runs once into the feature cache or every epoch, and gives the stage its forward
function (cached head only, the rest of the body from the cut, or everything; compiled with
``train.compile``; wrapped for DDP under torchrun), its MixUp/CutMix, its precision and memory
format, and its validation loader.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart.config import RunConfig
from headstart.data import DataBundle, make_loader
from headstart.evaluation.inference import evaluate
from headstart.evaluation.metrics import ClassReport
from headstart.models.network import Network
from headstart.runtime.chunks import chunk_size, chunked
from headstart.runtime.distributed import barrier, ddp_forward
from headstart.runtime.distributed import world as current_world
from headstart.runtime.precision import resolve_precision
from headstart.training.cache import body_fingerprint, cache_root, cacheable_part, cached_features, dataset_fingerprint

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
# (network, device, autocast dtype or None, images to extract) -> what runs the whole frozen body for
# the cache instead of ``net.features``, or None (PyTorch). Its ``name`` keys the cache entries, its
# ``engine`` and ``reason`` say what ran. ``headstart.deploy.features.body_engine`` makes one from
# ``cache.engine`` (ONNX Runtime, verified against PyTorch at the first batch).
BodyEngine = Callable[[Network, torch.device, Any, int], Any]


class StageInputs:
    """What a stage trains and validates on: images through the whole network, or cached tensors.

    While the whole body is frozen (and no auxiliary head trains) the body is a fixed function:
    its features are computed once per view instead of once per epoch, and only the head trains
    (``part = "body"``). While only the last depth groups train, the frozen first part of the
    body's step chain is cached the same way and the stage runs the rest of the body and the head
    on its stored output (``part = "prefix:K"``, K steps). Otherwise images go through everything.
    ``body_engine`` may run the whole body's extraction another way (see :data:`BodyEngine`).
    """

    def __init__(self, net: Network, data: DataBundle, cfg: RunConfig, device: torch.device,
                 say: Callable[[str], None], body_engine: BodyEngine | None = None,
                 views: int | None = None) -> None:
        self.net, self.data, self.cfg, self.device = net, data, cfg, device
        tc = cfg.train
        # Augmented views only when augmentation is on: --no-augment means plain features only.
        self.n_views = max(1, (views or cfg.cache.views) if cfg.data.augment else 1)
        self.view_seconds = 0.0  # extracting the view the current epoch cycled to (0: it was cached)
        self.precision = resolve_precision(tc.precision, device)
        self.channels_last = tc.channels_last is not False  # auto (None) means on
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        self.cut = 0  # chain steps whose output is cached (prefix part only)
        self.part = self._choose_part(say)
        self.cached = self.part is not None
        self.views: dict[int, Any] = {}
        self.body_fp = ""
        self.setup_seconds = 0.0  # feature extraction, counted in the stage's time
        self.data_fps: dict[int, str] = {}
        self.runner = None  # what runs the whole body for the cache, when not net.features
        if self.cached and self.part == "body" and body_engine is not None:
            self.runner = body_engine(net, device, self.precision.dtype, len(data.train) + len(data.val))
        self.engine = "torch" if self.runner is None else getattr(self.runner, "name", "custom")
        if self.cached:
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
            if getattr(self.runner, "engine", "pending") != "pending":  # it extracted something
                say(f"   features extracted by {getattr(self.runner, 'reason', self.engine)}")
            self.workers: int | None = 0
        else:
            self.val, self.workers = data.val, cfg.data.workers

    def _choose_part(self, say: Callable[[str], None]) -> str | None:
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
        need = per_image * (len(self.data.train) * self.n_views + len(self.data.val))
        if need > cfg.cache.max_gb * 2**30:
            say(f"   frozen first part not cached: its output would take {need / 2**30:.1f} GB "
                f"(cache.max_gb is {cfg.cache.max_gb:g}); the whole network runs every epoch")
            return None
        self.cut = cut
        return f"prefix:{cut}"

    def _cut_name(self) -> str:
        return self.net.chain[self.cut - 1].name if self.net.chain and self.cut else "-"

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self._chunked(lambda t: self.net.run_steps(t, 0, self.cut), x)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self._chunked(self.net.features, x)

    def _chunked(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``run(x)`` in micro-batches, as training runs them (``runtime/chunks.py``)."""
        return chunked(run, x, chunk_size(x, self.device, self.cfg.train.micro_batch))

    def _features(self, ds: Any, view: int, split: str) -> Any:
        # Under torchrun rank 0 extracts; the others wait, then read the same complete entry.
        if not current_world().main:
            barrier()
        out = self._extract(ds, view, split)
        if current_world().main:
            barrier()
        return out

    def _extract(self, ds: Any, view: int, split: str) -> Any:
        if id(ds) not in self.data_fps:  # once per dataset and stage, not once per view
            self.data_fps[id(ds)] = dataset_fingerprint(ds)
        what = "features" if self.part == "body" else f"features up to {self._cut_name()}"
        return cached_features(self.net, ds, body_fp=self.body_fp, kind=self.data.kind, view=view,
                               seed=self.cfg.train.seed, root=self.root, batch_size=self.cfg.data.batch_size * 2,
                               device=self.device, progress=self.cfg.train.progress,
                               desc=f"{what} {split}" + (f" view {view}" if split == "train" else ""),
                               precision=self.precision, policy=self.cfg.data.auto_augment,
                               data_fp=self.data_fps[id(ds)], part=self.part or "body",
                               run=self._prefix if self.part != "body" else self.runner or self._body,
                               engine=self.engine)

    def train_view(self, epoch: int) -> Any:
        """The training set of ``epoch``: the images, or the cached view the epoch cycles to."""
        if not self.cached:
            return self.data.train
        view = epoch % self.n_views
        self.view_seconds = 0.0
        if view not in self.views:
            start = time.perf_counter()
            self.views[view] = self._features(self.data.train, view, "train")
            self.view_seconds = time.perf_counter() - start
        return self.views[view]

    def solve_features(self) -> tuple[np.ndarray, list[int]]:
        """The training split's plain-view (evaluation transform) body features and targets: what the head is solved on.

        The cached view 0 when the stage reads cached body features. Otherwise (the cache off,
        MixUp/CutMix on, an auxiliary head training) they are extracted now, once, into a
        temporary folder that is gone afterwards, since the user did not ask for a cache.
        """
        if self.part == "body":
            ds = self.train_view(0)
            return np.array(ds.features, dtype=np.float32), list(ds.targets)  # a writable copy
        with tempfile.TemporaryDirectory(prefix="headstart-solve-") as tmp:
            ds = cached_features(self.net, self.data.train, body_fp=body_fingerprint(self.net), kind=self.data.kind,
                                 view=0, seed=self.cfg.train.seed, root=Path(tmp),
                                 batch_size=self.cfg.data.batch_size * 2, device=self.device,
                                 progress=self.cfg.train.progress, desc="features train (for the solver)",
                                 precision=self.precision)
            features = np.array(ds.features, dtype=np.float32)  # a copy: the file goes with the folder
            del ds
            return features, list(self.data.train.targets)

    def forward(self) -> Forward | None:
        """The stage's forward, batch -> (logits, aux logits); None: the network's own ``forward_train``."""
        if not hasattr(self, "_forward"):
            self._forward = self._build_forward()
        return self._forward

    def _build_forward(self) -> Forward | None:
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
        """What validation runs on the stage's validation inputs (the head alone on cached features)."""
        if self.part == "body":
            return self.net.head
        return _FromCut(self.net, self.cut) if self.part is not None else self.net

    def validate(self, classes: list[str]) -> ClassReport:
        """The stage's network as it stands, on the validation split (micro-batched as training is)."""
        return evaluate(self.eval_model(), self.val_loader(), classes, self.device,
                        micro_batch=self.cfg.train.micro_batch)

    def val_loader(self) -> DataLoader:
        """The validation set's loader: images, or their cached features."""
        return make_loader(self.val, batch_size=self.cfg.data.batch_size * 2, shuffle=False,
                           workers=self.workers, seed=self.cfg.train.seed)


class _FromCut(nn.Module):
    """The network from chain step ``cut`` on: the rest of the body, then the head."""

    def __init__(self, net: Network, cut: int) -> None:
        super().__init__()
        self.net, self.cut = net, cut

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.run_steps(a, self.cut))
