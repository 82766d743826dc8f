"""Cached features: run a frozen body once, not once per epoch.

While the whole body is frozen (the seed's first phase), its output for an image never changes, so
headstart computes it once, in inference mode and in batches, stores it on disk as a memory-mapped
``.npy`` file (data larger than RAM works), and trains the head from the stored tensors. When a
fine-tuning stage unfreezes only the last depth groups, the frozen first part of the body is
cached the same way (its output feature maps) and the stage trains the rest from them.

A cache entry is keyed by everything that changes the features: the body's weights (hashed from
the tensors themselves, so a local file, a named weights entry and a random initialisation are
all told apart), the preprocessing, the transform, and the images (each file's path and a hash of
its bytes, or the bytes of in-memory arrays). View 0 is the plain evaluation view;
with ``cache.views = K > 1`` views 1..K-1 are augmented copies and epoch e trains on view e mod K.

An entry is never read stale, torn or damaged:

* the images are keyed by their bytes, not by size and modification time (which an edit can
  keep); a file's stat is only a first check, within one process, before hashing it again;
* a file is written under a temporary name (``.view0.npy.<pid>.tmp``) and renamed, and
  ``view0.json`` is written last, so an entry from an interrupted run is never read as complete;
  temporary files whose process has died are removed;
* an entry whose files do not read back as they should (a partial ``view0.json``, a truncated
  ``.npy``) is treated as missing: it is rebuilt, with a warning naming it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from headstart.data import build_transform, make_loader
from headstart.errors import HeadstartError
from headstart.files import unwritable, unwritable_cause, write_atomically
from headstart.models.network import Network
from headstart.progress import Progress

log = logging.getLogger(__name__)
DEFAULT_DIR = "~/.cache/headstart/features"
# What to do when the cache folder cannot be written.
_ADVICE = "set --cache-dir (cache.dir) to a writable folder with room, or train with --no-cache"
# ``.view0.npy.<pid>.tmp``: a file being written by process ``pid``.
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


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
    """sha256 of what the dataset holds: file paths with a hash of each file's bytes, or array bytes."""
    h = hashlib.sha256(type(ds).__name__.encode())
    h.update(str(getattr(ds, "stored_shape", "")).encode())  # in-memory images: the size they were kept at
    if hasattr(ds, "paths"):
        for p, digest in zip(ds.paths, file_digests(ds.paths)):
            h.update(f"{p}|{digest}".encode())
    elif hasattr(ds, "images"):
        h.update(np.ascontiguousarray(ds.images).tobytes())
    else:
        h.update("\n".join(ds.describe(i) for i in range(len(ds))).encode())
    h.update(json.dumps(list(ds.targets)).encode())
    return h.hexdigest()


# (path, size, mtime, ctime, inode) -> digest, for files hashed already by this process: a training
# run fingerprints its datasets once per stage, and a file whose stat is unchanged within one
# process has not been rewritten (an edit moves ctime, which no tool can set back).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digests(paths: Sequence[str]) -> list[str]:
    """A hash (blake2b, 128 bits) of each file's bytes, reading files in parallel threads."""
    if len(_DIGESTS) > 2_000_000:  # a long session over many folders: some hundred MB of memo
        _DIGESTS.clear()
    # Threads overlap reads from slow disks; a few hundred files per task keep the pool's own
    # cost per task (tens of microseconds) below that of hashing a small file.
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(chunks)))) as pool:
        return [d for chunk in pool.map(lambda c: [_file_digest(p) for p in c], chunks) for d in chunk]


def _file_digest(path: str) -> str:
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        digest = _DIGESTS.get(key)
        if digest is None:
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = h.hexdigest()
            # A file changed within the file system's timestamp granularity of this read could
            # keep its stat: remember only files unchanged for a while (git's "racily clean").
            if time.time_ns() - st.st_ctime_ns > 2_000_000_000:
                _DIGESTS[key] = digest
        return digest
    except OSError as e:
        raise HeadstartError(f"cannot read {path} to look it up in the feature cache: {e.strerror or e}; "
                             "was it removed or changed while training?") from None


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

    def meta_file(self, view: int) -> Path:
        return self.folder / f"view{view}.json"

    def complete(self, view: int) -> bool:
        """True when both files of ``view`` exist (they are renamed into place only when whole)."""
        return self.meta_file(view).exists() and self.file(view).exists()

    def damage(self, view: int, images: int) -> str | None:
        """Why the complete entry of ``view`` cannot be used for ``images`` images, or None when it can."""
        meta = read_meta(self.meta_file(view))
        if meta is None:
            return f"{self.meta_file(view).name} does not parse"
        if meta.get("images") != images:
            return f"{self.meta_file(view).name} is for {meta.get('images')} images, not {images}"
        try:
            shape = np.load(self.file(view), mmap_mode="r").shape
        except (OSError, ValueError, EOFError) as e:
            return f"{self.file(view).name} does not read back ({e})"
        if not shape or shape[0] != images:
            return f"{self.file(view).name} holds {shape[0] if shape else 0} rows, not {images}"
        return None

    def discard(self, view: int) -> None:
        self.meta_file(view).unlink(missing_ok=True)
        self.file(view).unlink(missing_ok=True)


def read_meta(path: Path) -> dict[str, Any] | None:
    """A view's ``.json`` description, or None when it is missing or does not parse as an object."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def remove_orphans(folder: Path) -> int:
    """Delete the temporary files in ``folder`` left by processes that have died; returns how many."""
    removed = 0
    for f in folder.glob(".*.tmp"):
        m = _TEMPORARY.match(f.name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                f.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # someone else's process
        return True
    except (OSError, OverflowError):  # no such process, or no such pid at all
        return False
    return True


def view_transform(net: Network, kind: str, view: int, policy: str = "none") -> Any:
    """View 0: the evaluation transform; views 1..K-1: the training augmentation (with ``policy``)."""
    return build_transform(net.preprocessing, train=view > 0, augment=view > 0, kind=kind, policy=policy)


def make_key(net: Network, body_fp: str, ds: Any, kind: str, view: int, augment_seed: int,
             precision_dtype: Any = None, policy: str = "none", data_fp: str | None = None,
             part: str = "body", engine: str = "torch") -> str:
    """The cache key of ``ds``'s features through a body (``body_fp``; view > 0: augmented).

    ``data_fp`` is ``dataset_fingerprint(ds)`` when the caller already has it (hashing CIFAR's
    arrays or every file of a big folder is not free). ``part`` is ``body`` or
    ``prefix:K`` (the first K steps of the body's chain, whose weights ``body_fp`` then hashes).
    ``engine``: what was asked to run the body (``onnx``: ONNX Runtime, verified at the first batch); its
    features equal PyTorch's only within a tolerance, so they are kept apart (PyTorch's keys are unchanged).
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
    } | ({"engine": engine} if engine != "torch" else {})
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
                mm = _open_output(tmp, out, (len(ds), *f.shape[1:]))
            mm[at : at + len(f)] = f
            at += len(f)
            bar.update(len(f))
        mm.flush()
        del mm
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _open_output(tmp: Path, out: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable memory map of ``shape`` float32 at ``tmp``, its disk space claimed up front.

    A memory map on a disk that fills up mid-way kills the process with SIGBUS when a page is
    flushed; claiming the space first turns that into an error saying how much was needed.
    """
    need = int(np.prod(shape)) * 4
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        with open(tmp, "r+b") as f, contextlib.suppress(AttributeError):  # no posix_fallocate on macOS
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems that cannot say
                    raise
        return mm
    except OSError as e:
        if unwritable_cause(e) is None:
            raise
        raise unwritable(out, e, need=need, what=_ADVICE) from None


def cached_features(net: Network, ds: Any, *, body_fp: str, kind: str, view: int, seed: int, root: Path,
                    batch_size: int, device: torch.device, progress: bool, desc: str, precision: Any = None,
                    policy: str = "none", data_fp: str | None = None, part: str = "body", engine: str = "torch",
                    run: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FeatureDataset:
    """The features of ``ds`` for ``view``, computed now unless a complete cache entry exists.

    ``run`` and ``part`` cache a prefix of the body instead (see :meth:`Network.frozen_prefix`);
    ``run`` and ``engine`` (``onnx``) run the whole body another way; the entry records ``run.engine``.
    """
    dtype = getattr(precision, "dtype", None)
    key = make_key(net, body_fp, ds, kind, view, seed, dtype, policy, data_fp, part, engine)
    cache = FeatureCache(root, key)
    if cache.complete(view) and (why := cache.damage(view, len(ds))) is not None:
        log.warning("feature cache entry %s is damaged (%s): rebuilding it", cache.folder, why)
        cache.discard(view)
    if not cache.complete(view):
        _claim_folder(cache.folder)
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
                "engine": getattr(run, "engine", "torch"), "seconds": time.perf_counter() - start,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "source": desc}
        write_atomically(cache.meta_file(view), lambda f: f.write(json.dumps(meta).encode()))
    return FeatureDataset(cache.file(view), list(ds.targets))


def _claim_folder(folder: Path) -> None:
    """Create the entry's folder (clearing what killed runs left in it), or say why it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if unwritable_cause(e) is None:
            raise
        raise unwritable(folder, e, what=_ADVICE) from None
    remove_orphans(folder)


# ---------------------------------------------------------------------- headstart cache info|clear


def cache_entries(root: Path) -> list[dict[str, Any]]:
    """One dict per cache entry folder: key, views, size in bytes, what it holds.

    Temporary files of processes that have died are removed first; those of running processes
    are not counted. An entry whose description does not parse is listed as damaged (training
    rebuilds it when it needs it).
    """
    out = []
    if not root.exists():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        remove_orphans(folder)
        files = sorted(folder.glob("view*.json"))
        metas = [m for m in (read_meta(f) for f in files) if m is not None]
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.endswith(".tmp"))
        first = metas[0] if metas else {}
        source = first.get("source", "?") if metas else "incomplete"
        if len(metas) < len(files):
            source = f"damaged ({len(files) - len(metas)} unreadable view description(s)); {source}"
        out.append({"key": folder.name, "views": len(metas), "bytes": size,
                    "model": first.get("model", "?"), "images": first.get("images", 0),
                    "part": first.get("part", "body") if metas else "?",
                    "source": source, "created": first.get("created", "?")})
    return out


def clear_cache(root: Path) -> int:
    """Remove every cache entry under ``root``; returns how many were removed."""
    entries = cache_entries(root)
    for e in entries:
        shutil.rmtree(root / e["key"], ignore_errors=True)
    return len(entries)
