"""Cached features: run a frozen body once, not once per epoch.

While the whole body is frozen (the seed's first phase), its output for an image never changes, so
headstart computes it once, in inference mode and in batches, stores it on disk as a memory-mapped
``.npy`` file (data larger than RAM works), and trains the head from the stored tensors. When a
fine-tuning stage unfreezes only the last depth groups, the frozen first part of the body is
cached the same way (its output feature maps) and the stage trains the rest from them.

A cache entry is keyed by everything that changes the features: the body's weights (hashed from
the tensors themselves, so a local file, a named weights entry and a random initialisation are
all told apart), the preprocessing, the transform, and the images (file paths, sizes and
modification times, or the bytes of in-memory arrays). View 0 is the plain evaluation view;
with ``cache.views = K > 1`` views 1..K-1 are augmented copies and epoch e trains on view e mod K.
A file is written under a temporary name and renamed; ``meta.json`` is written last, so an entry
from an interrupted run is never read as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from headstart.data import build_transform, make_loader
from headstart.models.network import Network
from headstart.progress import Progress

log = logging.getLogger(__name__)
DEFAULT_DIR = "~/.cache/headstart/features"


def cache_root(path: str | None = None) -> Path:
    return Path(os.path.expanduser(path or os.environ.get("HEADSTART_CACHE", DEFAULT_DIR)))


class FeatureDataset(Dataset):
    """Stored features with their labels; items are ``(feature tensor, label)``."""

    in_memory = True  # reads are page-cache hits: worker processes would only add start-up time

    def __init__(self, path: Path, targets: list[int]) -> None:
        self.path, self.targets = path, list(targets)
        self.features = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.features[i])), self.targets[i]

    def __getstate__(self) -> dict[str, Any]:  # memmaps are reopened in worker processes
        return {"path": self.path, "targets": self.targets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["targets"])


def cacheable_part(net: Network, cfg: Any) -> tuple[str | None, int]:
    """What of the body, frozen as it is now, a stage can run once: ``("body", 0)``, the first
    ``cut`` chain steps ``("prefix", cut)``, or ``(None, 0)``. ``cfg`` is the run's ``cache``
    section; the stage then checks what needs the data (mixing, size)."""
    # With BatchNorm policy "train" a frozen body still changes its output from batch to batch
    # (batch statistics), so its features cannot be stored.
    if not cfg.enabled or net.bn_policy == "train":
        return None, 0
    if not any(p.requires_grad for p in net.body.parameters()):
        return "body", 0
    cut = net.frozen_prefix() if cfg.prefix else 0
    return ("prefix", cut) if cut else (None, 0)


def body_fingerprint(net: Network) -> str:
    """sha256 over the body's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256(net.name.encode())
    for name, t in net.body.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(ds: Any) -> str:
    """sha256 of what the dataset holds: file paths with sizes and times, or array bytes."""
    h = hashlib.sha256(type(ds).__name__.encode())
    h.update(str(getattr(ds, "stored_shape", "")).encode())  # in-memory images: the size they were kept at
    if hasattr(ds, "paths"):
        for p in ds.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    elif hasattr(ds, "images"):
        h.update(np.ascontiguousarray(ds.images).tobytes())
    else:
        h.update("\n".join(ds.describe(i) for i in range(len(ds))).encode())
    h.update(json.dumps(list(ds.targets)).encode())
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Features of one body on one dataset split, one file per view."""

    root: Path
    key: str

    @property
    def folder(self) -> Path:
        return self.root / self.key

    def file(self, view: int) -> Path:
        return self.folder / f"view{view}.npy"

    def complete(self, view: int) -> bool:
        meta = self.folder / f"view{view}.json"
        return meta.exists() and self.file(view).exists()


def view_transform(net: Network, kind: str, view: int, policy: str = "none") -> Any:
    """View 0: the evaluation transform; views 1..K-1: the training augmentation (with ``policy``)."""
    return build_transform(net.preprocessing, train=view > 0, augment=view > 0, kind=kind, policy=policy)


def make_key(net: Network, body_fp: str, ds: Any, kind: str, view: int, augment_seed: int,
             precision_dtype: Any = None, policy: str = "none", data_fp: str | None = None,
             part: str = "body") -> str:
    """The cache key of ``ds``'s features through a body (``body_fp``; view > 0: augmented).

    ``data_fp`` is ``dataset_fingerprint(ds)`` when the caller already has it (hashing CIFAR's
    arrays or stat-ing every file of a big folder is not free). ``part`` is ``body`` or
    ``prefix:K`` (the first K steps of the body's chain, whose weights ``body_fp`` then hashes).
    """
    parts = {
        "body": body_fp,
        "part": part,
        "data": data_fp or dataset_fingerprint(ds),
        "pre": net.preprocessing.to_dict() | {"categories": None},
        "kind": kind,
        "transform": repr(view_transform(net, kind, view, policy)),
        "seed": augment_seed if view > 0 else None,
        "precision": str(precision_dtype),
        # In-memory photos transformed per batch on the device (headstart.data.memory) differ from the
        # per-image transform in the last bits: their features are kept apart.
        "batched": getattr(ds, "batch_device", None) is not None and kind == "photo"
        and (view == 0 or policy == "none"),
        "format": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def extract(net: Network, ds: Any, out: Path, *, batch_size: int, device: torch.device, view_seed: int | None,
            progress: bool, desc: str, precision: Any = None,
            run: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run the body (or ``run``, a part of it) over ``ds`` once; write the outputs to ``out`` atomically."""
    run = run or net.features
    net.eval()
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, workers=None, seed=view_seed or 0)
    if view_seed is not None:
        torch.manual_seed(view_seed)  # augmented views are reproducible
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    mm = None
    bar = Progress(loader, len(loader), desc, enabled=progress)
    at = 0
    try:
        for x, _ in bar:
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                f = run(x.to(device)).float().cpu().numpy()
            if mm is None:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ds), *f.shape[1:]))
            mm[at : at + len(f)] = f
            at += len(f)
            bar.update(len(f))
        mm.flush()
        del mm
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def cached_features(net: Network, ds: Any, *, body_fp: str, kind: str, view: int, seed: int, root: Path,
                    batch_size: int, device: torch.device, progress: bool, desc: str,
                    precision: Any = None, policy: str = "none", data_fp: str | None = None,
                    run: Callable[[torch.Tensor], torch.Tensor] | None = None, part: str = "body") -> FeatureDataset:
    """The features of ``ds`` for ``view``, computed now unless a complete cache entry exists.

    ``run`` and ``part`` cache a prefix of the body instead (see :meth:`Network.frozen_prefix`).
    """
    key = make_key(net, body_fp, ds, kind, view, seed, getattr(precision, "dtype", None), policy, data_fp, part)
    cache = FeatureCache(root, key)
    if not cache.complete(view):
        cache.folder.mkdir(parents=True, exist_ok=True)
        saved = ds.transform
        ds.transform = view_transform(net, kind, view, policy)
        start = time.perf_counter()
        try:
            extract(net, ds, cache.file(view), batch_size=batch_size, device=device,
                    view_seed=seed * 1009 + view if view > 0 else None, progress=progress, desc=desc,
                    precision=precision, run=run)
        finally:
            ds.transform = saved
        meta = {"images": len(ds), "model": net.name, "part": part, "view": view,
                "seconds": time.perf_counter() - start,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "source": desc}
        (cache.folder / f"view{view}.json").write_text(json.dumps(meta))
    return FeatureDataset(cache.file(view), list(ds.targets))


# ---------------------------------------------------------------------- headstart cache info|clear


def cache_entries(root: Path) -> list[dict[str, Any]]:
    """One dict per cache entry folder: key, views, size in bytes, what it holds."""
    out = []
    if not root.exists():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        metas = [json.loads(m.read_text()) for m in sorted(folder.glob("view*.json"))]
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out.append({"key": folder.name, "views": len(metas), "bytes": size,
                    "model": metas[0]["model"] if metas else "?", "images": metas[0]["images"] if metas else 0,
                    "part": metas[0].get("part", "body") if metas else "?",
                    "source": metas[0].get("source", "?") if metas else "incomplete",
                    "created": metas[0].get("created", "?") if metas else "?"})
    return out


def clear_cache(root: Path) -> int:
    """Remove every cache entry under ``root``; returns how many were removed."""
    entries = cache_entries(root)
    for e in entries:
        shutil.rmtree(root / e["key"], ignore_errors=True)
    return len(entries)
