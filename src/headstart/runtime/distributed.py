"""Multi-process training on PyTorch's own engine: ``torchrun ... -m headstart train``.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; headstart then joins the process group
(NCCL on GPUs, gloo on CPUs), wraps what trains in ``DistributedDataParallel``, gives each rank its
share of every epoch's seeded permutation (``data.batch_size`` stays the *global* batch), reduces
the training metrics across ranks, builds feature caches on rank 0 only (the others wait, then read
the same files), and lets only rank 0 write logs, checkpoints and reports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from headstart.errors import HeadstartError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the job (a one-process world without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init_from_env(device_spec: str = "auto") -> World:
    """Join the process group torchrun describes; a no-op for a plain one-process run."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # NCCL for the GPU tensors, gloo for the small CPU tensors metrics travel in.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return world()


def local_device(spec: str) -> str:
    """``cuda:LOCAL_RANK`` for a multi-GPU job; the spec unchanged otherwise."""
    w = world()
    if w.enabled and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return spec


def per_rank_batch(global_batch: int) -> int:
    w = world()
    if global_batch % w.size:
        raise HeadstartError(f"batch size {global_batch} does not split evenly over {w.size} processes")
    return global_batch // w.size


class ShardSampler(Sampler[int]):
    """Rank r's share (every size-th index from r) of a permutation every rank draws identically."""

    def __init__(self, base: Sampler[int], w: World) -> None:
        self.base, self.w = base, w

    def _indices(self) -> list[int]:
        order = list(self.base)
        # Pad by wrapping so every rank takes the same number of steps (DDP needs that).
        total = math.ceil(len(order) / self.w.size) * self.w.size
        order += order[: total - len(order)]
        return order[self.w.rank :: self.w.size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return math.ceil(len(self.base) / self.w.size)


class _Forward(nn.Module):
    """Gives DistributedDataParallel a forward that returns (logits, aux logits)."""

    def __init__(self, fn: Any, owner: nn.Module) -> None:
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self._fn(x)


def ddp_forward(fn: Any, owner: nn.Module, device: torch.device, find_unused: bool = False) -> Any:
    """Wrap ``fn`` (run by ``owner``'s parameters) so gradients are averaged across ranks."""
    ids = [device.index] if device.type == "cuda" else None
    # Buffers are not broadcast: frozen BatchNorm statistics are identical on every rank anyway.
    # find_unused: auxiliary classifiers only produce outputs in some stages.
    return nn.parallel.DistributedDataParallel(_Forward(fn, owner), device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=find_unused)


def all_sum(*values: float) -> list[float]:
    """Sums of the given numbers over all ranks (the numbers themselves in a one-process run)."""
    if not world().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank, so all ranks take the same branch."""
    if not world().enabled:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if world().enabled:
        dist.barrier()
