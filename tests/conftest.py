"""Shared test set-up: one torch thread, and caches kept inside each test's tmp_path."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # Tests run tiny models, where a second thread buys little and, on a shared 2-core machine,
    # costs a lot (thrashing made steps 5-10x slower). Child processes inherit the setting.
    threads = torch.get_num_threads()
    n = int(os.environ.get("HEADSTART_TEST_THREADS", "1"))
    torch.set_num_threads(n)
    monkeypatch.setenv("OMP_NUM_THREADS", str(n))
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "feature-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield
    torch.set_num_threads(threads)
