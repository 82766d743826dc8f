"""Micro-batching: images from concurrent requests share one forward pass.

A CPU or GPU runs a batch of 8 images in far less than 8 times the time of one, so a server that
answers each request on its own wastes most of its capacity under load. :class:`MicroBatcher`
queues every image it is given; one worker thread takes the first waiting image, gathers more
until it holds ``max_batch`` of them or ``max_wait_ms`` have passed since the first, runs the
model once on the stacked batch and hands every caller its own row of probabilities.

Inference thus runs off the event loop (the server keeps accepting and answering requests while
the model computes), one batch at a time (the model is never entered by two threads at once, so
a backend need not be thread-safe and the cores are not oversubscribed), and the queue is bounded
(``max_queue``): past it a caller is told the server is busy instead of being queued for ever.

Example::

    batcher = MicroBatcher(predictor.logits, max_batch=8, max_wait_ms=5)
    batcher.start()
    probs, batch_size = batcher.submit(x).result()   # from a thread; ``await batcher.run([x])`` in async code
    batcher.stop()
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

_STOP = object()  # put on the queue to end the worker once the images before it are answered


class Busy(Exception):
    """The batcher's queue is full: the caller should answer 503 and let the client retry."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (exact enough for probabilities shown to 4 digits)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)  # no overflow for large logits
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class MicroBatcher:
    """Gathers single images into batches for ``infer`` and runs them on one worker thread.

    ``infer`` maps a float32 array ``(N, 3, H, W)`` to logits ``(N, C)``. ``submit`` returns a
    :class:`concurrent.futures.Future` whose result is ``(probabilities (C,), batch_size)``: the
    second item says how many images shared the forward pass, which is what lets tests and
    clients see that batching happened.
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_queue: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters below, read from the event loop
        self._sizes: Counter[int] = Counter()
        self._images = 0
        self._failed_batches = 0
        self._busy_seconds = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the worker thread (a daemon: a crashed server never hangs on it at exit)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="headstart-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Answer the images already queued, then end the worker thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ submitting

    def submit(self, x: np.ndarray) -> Future:
        """Queue one preprocessed image ``(3, H, W)``; raises :class:`Busy` when the queue is full."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        # qsize is approximate under concurrency; a bound that is off by a few is still a bound.
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self._queue.qsize()} images are waiting for the model (limit {self.max_queue})")
        fut: Future = Future()
        self._queue.put((x, fut))
        return fut

    async def run(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """Submit ``images`` together (so they can share a batch) and await their answers.

        If the awaiting task is cancelled (its client went away), the images not yet taken by
        the worker are cancelled too and never reach the model.
        """
        futures = [self.submit(x) for x in images]
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            for f in futures:
                f.cancel()  # a no-op for those already answered

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, Any]:
        """Batches run so far: how many, of which sizes, images answered, seconds spent in the model."""
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
            return {
                "batches": sum(sizes.values()),
                "images": self._images,
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                "largest_batch": max(sizes, default=0),
                "failed_batches": self._failed_batches,
                "inference_seconds": round(self._busy_seconds, 4),
                "queued": self._queue.qsize(),
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0,
            }

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        """Worker loop: gather a batch, run it, answer it; until the stop marker arrives."""
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._gather(first)
            self._run_batch(batch)

    def _gather(self, first: tuple[np.ndarray, Future]) -> tuple[list[tuple[np.ndarray, Future]], bool]:
        """Collect up to ``max_batch`` live items, waiting at most ``max_wait`` after the first."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline, still take what is already waiting: it costs no latency.
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return self._live(batch), True
            batch.append(item)
        return self._live(batch), False

    @staticmethod
    def _live(batch: list[tuple[np.ndarray, Future]]) -> list[tuple[np.ndarray, Future]]:
        """Drop items whose caller gave up (cancelled futures); mark the rest as running."""
        return [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]

    def _run_batch(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        """One forward pass; every caller gets its row, or the exception if the model failed."""
        if not batch:
            return
        start = time.perf_counter()
        try:
            logits = np.asarray(self.infer(np.stack([x for x, _ in batch])))
            if logits.shape[0] != len(batch):
                raise RuntimeError(f"the model returned {logits.shape[0]} rows for a batch of {len(batch)}")
            probs = softmax(logits)
        except Exception as e:  # noqa: BLE001 - any model failure goes to the callers, never kills the worker
            with self._lock:
                self._failed_batches += 1
            for _, f in batch:
                f.set_exception(e)
            return
        seconds = time.perf_counter() - start
        with self._lock:
            self._sizes[len(batch)] += 1
            self._images += len(batch)
            self._busy_seconds += seconds
        for (_, f), p in zip(batch, probs):
            f.set_result((p, len(batch)))


__all__ = ["Busy", "MicroBatcher", "softmax"]
