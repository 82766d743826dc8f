"""Shared test set-up: one torch thread, caches inside each test's tmp_path, logging restored; the
real ImageNet samples of ``../shared/data`` for the tests marked ``data``."""

from __future__ import annotations

import csv
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch

# Tests run tiny models, where a second thread buys little and, on a shared 2-core machine,
# costs a lot (thrashing made steps 5-10x slower). HEADSTART_TEST_THREADS=2 restores two.
THREADS = int(os.environ.get("HEADSTART_TEST_THREADS", "1"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))  # child processes (torchrun, kill tests)
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "feature-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI's main() reconfigures logging
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$HEADSTART_SHARED_DATA``): real data, never committed."""
    env = os.environ.get("HEADSTART_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def unpack_shared(tmp_path_factory, name: str) -> Path:
    """Unpack ``../shared/data/<name>`` into a fresh temporary folder (the test skips when it is absent)."""
    tarball = shared_data() / name
    if not tarball.is_file():
        pytest.skip(f"{tarball} not found")
    root = tmp_path_factory.mktemp(name.split(".")[0])
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def imagenet_samples(tmp_path_factory) -> tuple[Path, list[tuple[str, int]]]:
    """Every other one of the 1,000 sample images, unpacked once: (folder, [(file, class_index)]).

    500 images halve the run time (the CPU forward passes dominate) and still separate a right
    preprocessing from a wrong one: see the bounds in test_weights_store.py and test_pretrained.py.
    """
    folder = unpack_shared(tmp_path_factory, "imagenet-samples.tar.gz") / "imagenet-samples"
    with open(folder / "labels.csv", newline="") as f:
        rows = [(r["file"], int(r["class_index"])) for r in csv.DictReader(f)]
    return folder, rows[::2]
