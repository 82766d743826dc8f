"""Progress that suits where the output goes.

On a terminal a live bar (tqdm) shows loss, accuracy, images/s and the ETA. When the output is a
log file or CI, a bar would write thousands of carriage returns; plain lines every few seconds
(and at the end) are written instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm


class Progress:
    """Wrap an iterable of batches; call ``update(images, **stats)`` after each batch."""

    def __init__(self, iterable: Iterable[Any], total: int, desc: str, enabled: bool = True, every: float = 10.0):
        self.iterable, self.total, self.desc, self.every = iterable, total, desc, every
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if self.tty else None
        self.start = self.last = time.perf_counter()
        self.images, self.done, self.stats = 0, 0, {}

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.iterable
        finally:
            self.close()

    @property
    def rate(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)

    def update(self, images: int, **stats: float) -> None:
        self.images += images
        self.done += 1
        self.stats = stats
        text = {k: f"{v:.4g}" for k, v in stats.items()} | {"img/s": f"{self.rate:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            eta = (self.total - self.done) * (self.last - self.start) / max(1, self.done)
            body = " ".join(f"{k} {v}" for k, v in text.items())
            print(f"  {self.desc} {self.done}/{self.total} {body} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
