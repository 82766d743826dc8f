"""Shared helpers for headstart's benchmarks: real CIFAR-10 subsets, timing, one-line JSON results.

Data: ``../shared/data/cifar10-train.tar.gz`` (relative to the repository root; ``--data-dir``
overrides) holds the CIFAR-10 train split as JPEGs in ``cifar10/train/<class>/NNNN.jpg``. It is
unpacked once into a scratch folder (``/tmp/headstart-bench/cifar10`` by default, never the
repository), and class-balanced, seeded subsets are built beside it as ImageFolder trees of
symlinks (``train/<class>/*`` and ``val/<class>/*``), which headstart's folder loader reads
directly (``--data /tmp/headstart-bench/subset-500-100-s0``).

Results: every benchmark prints exactly one JSON line on stdout (progress goes to stderr). When
the data is absent it prints ``{"skipped": true, "reason": ...}`` and exits 0.

Timing: this machine's speed drifts by up to 2x within minutes, so contenders always run side by
side in one process, alternating, and results are reported as ratios and medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; from a git worktree one level further down (wt/NAME), ../../shared/data.
DEFAULT_DATA_DIR = next((d for d in (REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data")
                         if d.is_dir()), REPO.parent / "shared" / "data")
DEFAULT_WORK_DIR = Path(os.environ.get("HEADSTART_BENCH_DIR", "/tmp/headstart-bench"))
CIFAR_TARBALL = "cifar10-train.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ---------------------------------------------------------------------- output


def log(msg: str) -> None:
    """Progress for humans: stderr, flushed, with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The benchmark's one result line on stdout."""
    print(json.dumps(result, sort_keys=False, default=_jsonable), flush=True)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def per_model(args: argparse.Namespace, measure: Any) -> None:
    """``measure(name, size, args)`` for each ``name:size`` of ``args.models``: each result line on
    stdout and appended to ``args.results``."""
    setup_torch(args.threads)
    for spec in args.models.split(","):
        name, size = spec.split(":")
        out = measure(name, int(size), args)
        emit(out)
        with open(args.results, "a") as f:
            f.write(json.dumps(out) + "\n")


def skip(benchmark: str, reason: str) -> None:
    """Print a skipped result and exit 0 (absent data is not a failure)."""
    log(f"SKIPPED: {reason}")
    emit({"benchmark": benchmark, "skipped": True, "reason": reason})
    sys.exit(0)


# ---------------------------------------------------------------------- arguments and environment


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small smoke version (about a minute)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help=f"folder holding {CIFAR_TARBALL} (default: ../shared/data from the repo root)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR),
                   help="scratch folder for the unpacked data, subsets and caches (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # headstart's fit() sets this process-wide (runtime.device.set_cpu_speed_flags); set it up front so
    # a hand-written contender that runs first gets the same treatment.
    torch.set_flush_denormal(True)


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    info["tiny_op_ms"] = round(tiny_op_ms(), 3)
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


# A probe above this means another process was competing for the cores (quiet: ~0.5 ms).
QUIET_PROBE_MS = 3.0


def tiny_op_ms(steps: int = 40) -> float:
    """Milliseconds per tiny training step (Linear 1280->10, batch 64) at the current thread count.

    A contention probe: on an idle 2-core machine this is ~0.5 ms; when another process keeps a
    core busy, every OpenMP parallel region waits for a descheduled thread and it jumps to tens of
    ms. Benchmarks record it at their end so results taken under contention can be told apart.
    """
    import torch

    head = torch.nn.Linear(1280, 10)
    opt = torch.optim.AdamW(head.parameters())
    x, y = torch.randn(64, 1280), torch.randint(0, 10, (64,))
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 1000 * (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------- data


def cifar_root(data_dir: str | Path, work_dir: str | Path, benchmark: str) -> Path:
    """``<work>/cifar10/train`` (unpacked once); skips the benchmark when the tarball is absent."""
    tarball = Path(data_dir).expanduser() / CIFAR_TARBALL
    if not tarball.is_file():
        skip(benchmark, f"{tarball} not found (real data lives in ../shared/data; pass --data-dir)")
    work = Path(work_dir).expanduser()
    dest = work / "cifar10"
    done = dest / ".complete"
    if not done.exists():
        log(f"unpacking {tarball} into {work} (once)")
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / f".unpack-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        if dest.exists():  # a half-finished earlier unpack
            shutil.rmtree(dest)
        os.replace(tmp / "cifar10", dest)
        shutil.rmtree(tmp, ignore_errors=True)
        done.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    return dest / "train"


def make_subset(train_root: Path, work_dir: str | Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A class-balanced ImageFolder tree of symlinks: ``train/`` (n_train per class), ``val/`` (n_val).

    Per class, the files are shuffled with a seeded generator; the first ``n_train`` go to
    train and the next ``n_val`` to val, so the two never overlap. The same arguments always
    give the same subset.
    """
    out = Path(work_dir).expanduser() / f"subset-{n_train}-{n_val}-s{seed}"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    for c in classes:
        files = sorted((train_root / c).glob("*.jpg"))
        if len(files) < n_train + n_val:
            raise SystemExit(f"class {c} has {len(files)} images, fewer than {n_train} + {n_val}")
        order = rng.permutation(len(files))
        for split, idx in (("train", order[:n_train]), ("val", order[n_train:n_train + n_val])):
            d = tmp / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in sorted(idx):
                (d / files[i].name).symlink_to(files[i].resolve())
    (tmp / ".complete").write_text(json.dumps({"n_train": n_train, "n_val": n_val, "seed": seed}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def subset_for(args: argparse.Namespace, benchmark: str, n_train: int, n_val: int) -> Path:
    """Unpack (once) and build the per-class ``n_train``/``n_val`` subset for ``args``."""
    root = cifar_root(args.data_dir, args.work_dir, benchmark)
    path = make_subset(root, args.work_dir, n_train, n_val, args.seed)
    log(f"subset: {path} ({n_train}/class train, {n_val}/class val)")
    return path


# ---------------------------------------------------------------------- timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def two_sides(speeds: dict[str, dict[str, list[float]]], a: str, b: str) -> dict[str, float]:
    """For each kind of ``speeds[side][kind]`` (per-round images/s): side ``a``'s and ``b``'s median
    and the median of the per-round ratios b / a, as ``{kind}_{side}_img_s`` and ``{kind}_ratio``."""
    out: dict[str, float] = {}
    for kind in speeds[a]:
        xs, ys = speeds[a][kind], speeds[b][kind]
        out[f"{kind}_{a}_img_s"] = round(median(xs), 1)
        out[f"{kind}_{b}_img_s"] = round(median(ys), 1)
        out[f"{kind}_ratio"] = round(median([y / x for x, y in zip(xs, ys)]), 2)
    return out


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("inf")


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def alternate(n_rounds: int, names: Sequence[str]) -> list[list[str]]:
    """Run order per round: A B, A B, ... (contenders interleaved, so both see the same drift)."""
    return [list(names) for _ in range(n_rounds)]


def round_floats(d: Any, nd: int = 4) -> Any:
    if isinstance(d, float):
        return round(d, nd)
    if isinstance(d, dict):
        return {k: round_floats(v, nd) for k, v in d.items()}
    if isinstance(d, list):
        return [round_floats(v, nd) for v in d]
    return d


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_headstart(args: list[str], log_file: Path, threads: int) -> None:
    """``headstart ARGS`` in a subprocess on ``threads`` threads, its output in ``log_file``; exits with the
    log's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "headstart", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"headstart failed ({proc.returncode}); log {log_file}:\n{log_file.read_text()[-3000:]}")
