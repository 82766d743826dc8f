"""Shared test set-up: one torch thread, caches inside each test's tmp_path, logging restored."""

from __future__ import annotations

import logging
import os

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
