"""Micro-batches: a batch of images run through the network a few images at a time on the CPU.

On a CPU a convolutional network runs much faster per image on a few images at a time than on a
whole batch of large ones: the activations of a small chunk stay in the caches. Measured on this
project's 2-core machine (bench/micro_batch.py, batches of 64), a training step of
EfficientNet-Lite1 at 240 px ran 2.5x faster in chunks of 4 (7.7 -> 19 images/s), Lite2 at 260 px
3.1x, MobileNetV2 at 224 px 1.7x (chunks of 5), ResNet-50 1.15x, and inference 1.45-1.6x; Lite1
at 128 px gained nothing (the whole batch already fits). The best chunk held about 256k pixels at
every size (a sweep: 4-8 images at 224 px, 16 at 128), hence :data:`CPU_CHUNK_ELEMENTS`: three
colour planes of 256k pixels. Counting elements, not pixels, sizes chunks of a frozen prefix's
feature maps too (MobileNetV2's 16 x 112 x 112 maps ran 46 images/s in chunks of 3 against 15 whole).

Training adds the chunks' gradients and steps once per batch, so the optimizer, the schedule and
the batch size are untouched. With every BatchNorm in eval mode (fine-tuning's ``eval-all``) the
step is the one the whole batch gives, to float rounding; a BatchNorm that updates would
normalise each chunk by its own statistics, so ``auto`` leaves such batches whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

CPU_CHUNK_ELEMENTS = 3 * 256 * 1024  # per chunk: 16 RGB images at 128 px, 5 at 224, 64 at 64


def chunk_size(x: torch.Tensor, device: torch.device, setting: int | None = None) -> int:
    """Items per forward pass for the batch ``x``: ``setting`` when given, else (auto) about
    :data:`CPU_CHUNK_ELEMENTS` per chunk for images or feature maps on the CPU, and the whole
    batch otherwise (a GPU, or cached feature vectors)."""
    n = x.shape[0]
    if setting is not None:
        return max(1, min(n, setting))
    if device.type != "cpu" or x.ndim != 4:
        return n
    return max(1, min(n, CPU_CHUNK_ELEMENTS // x[0].numel()))


def train_chunk_size(x: torch.Tensor, device: torch.device, setting: int | None, updating_bn: bool) -> int:
    """:func:`chunk_size` for a training step: auto leaves the batch whole while a BatchNorm updates
    (``updating_bn``, see :func:`batch_statistics`: chunks would each be normalised by their own statistics)."""
    if setting is None and updating_bn:
        return x.shape[0]
    return chunk_size(x, device, setting)


def spans(n: int, size: int) -> list[slice]:
    """``n`` items as consecutive slices of at most ``size``.

    >>> spans(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    return [slice(i, min(n, i + size)) for i in range(0, n, max(1, size))]


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int) -> torch.Tensor:
    """``fn(x)``, computed ``size`` images at a time and concatenated (one call when it all fits)."""
    if size >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(x[s]) for s in spans(x.shape[0], size)])


def batch_statistics(net: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``net`` is in train mode: it normalises by the batch's own
    statistics, so chunks of the batch would not give the batch's step."""
    return any(m.training for m in net.modules() if isinstance(m, _BatchNorm))
