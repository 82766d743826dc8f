"""Where a run computes and how it is seeded: the device, CPU speed flags, global seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from headstart.errors import HeadstartError


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise HeadstartError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise HeadstartError(f"device {spec} is not available here ({count} CUDA device(s)); use auto or cpu")
    return device


def set_cpu_speed_flags() -> None:
    # Tiny activations (a randomly initialised deep net whose BatchNorm keeps its initial
    # statistics, for one) underflow into denormal floats, which x86 CPUs handle ~100x slower;
    # flushing them to zero changes no result that matters and keeps epochs from crawling.
    torch.set_flush_denormal(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
