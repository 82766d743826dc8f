"""The prediction job: classify image files with a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from headstart.data import build_transform, list_images, load_image
from headstart.errors import HeadstartError
from headstart.models import checkpoint
from headstart.runtime.device import pick_device


class Predictions(list):
    """The predictions, one dict per readable image, in input order; ``unreadable`` lists the
    (file, reason) pairs that were skipped."""

    def __init__(self, items: Sequence[dict[str, Any]] = (), unreadable: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self.unreadable = list(unreadable)


@torch.no_grad()
def predict(ckpt_path: str | Path, inputs: Sequence[str | Path], *, top_k: int = 5, device: str = "auto",
            batch_size: int = 32, strict: bool = False) -> Predictions:
    """Classify image files (folders are searched); one dict per image with its top-k classes.

    An image that cannot be read is skipped and listed in the result's ``unreadable``; with
    ``strict``, or when no image at all could be read, that is an error instead.
    """
    net, ckpt = checkpoint.load_network(ckpt_path)
    paths: list[Path] = []
    for item in inputs:
        paths += list_images(item)
    classes = list(ckpt["classes"])
    tf = build_transform(net.preprocessing, train=False, augment=False, kind=ckpt.get("kind", "photo"))
    images, unreadable = _read_all(paths, tf)
    if unreadable and (strict or not images):
        shown = "; ".join(why for _, why in unreadable[:5])
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        what = "no image could be read" if not images else f"{len(unreadable)} of {len(paths)} images are unreadable"
        raise HeadstartError(f"{what}: {shown}{more}")
    dev = pick_device(device)
    net.to(dev).eval()
    k = max(1, min(top_k, len(classes)))
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = torch.stack([t for _, t in chunk]).to(dev)
        probs = net(x).float().softmax(1).cpu()
        conf, idx = probs.topk(k, dim=1)
        for (p, _), c, j in zip(chunk, conf.tolist(), idx.tolist()):
            out.append({"file": str(p), "top": [{"class": classes[a], "probability": b} for a, b in zip(j, c)]})
    return Predictions(out, unreadable)


def _read_all(paths: Sequence[Path], tf: Any) -> tuple[list[tuple[Path, torch.Tensor]], list[tuple[str, str]]]:
    """Each path decoded and transformed, or its reason for failing."""
    good, bad = [], []
    for p in paths:
        try:
            good.append((p, tf(load_image(p))))
        except HeadstartError as e:
            bad.append((str(p), str(e)))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged file
            bad.append((str(p), f"cannot read image {p}: {type(e).__name__}: {e}"))
    return good, bad
