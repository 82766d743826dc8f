"""Speed switches: mixed precision, channels-last memory format, torch.compile.

Each is a config option (``train.precision``, ``train.channels_last``, ``train.compile``) with a
default chosen for the device, and each is safe on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from headstart.errors import HeadstartError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Precision:
    """The autocast dtype (None: fp32) and, for fp16, the gradient scaler."""

    dtype: torch.dtype | None
    scaler: Any | None
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    if spec not in PRECISIONS:
        raise HeadstartError(f"unknown precision {spec!r}; use {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if spec == "auto":
        spec = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if spec == "fp16" and not cuda:
        raise HeadstartError("fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]
    scaler = torch.amp.GradScaler("cuda") if spec == "fp16" else None
    return Precision(dtype, scaler, device.type)
