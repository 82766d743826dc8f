"""Checkpoints that are plain, safe and complete.

A headstart checkpoint is a dict of plain Python data and tensors: the model's state dict plus
everything needed to rebuild it with no network and no other file — architecture name, head
config, class names, preprocessing and the run's resolved config. It loads with
``torch.load(path, weights_only=True)``. Checkpoints are written to a temporary file and renamed
into place, so a crash never leaves a torn file behind.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from headstart.config import HeadConfig, from_dict
from headstart.errors import HeadstartError
from headstart.files import write_atomically
from headstart.models.backbones import arch_options
from headstart.models.network import Network
from headstart.models.preprocess import Preprocessing

FORMAT = "headstart-checkpoint/1"


def model_record(net: Network, classes: list[str], kind: str = "photo") -> dict[str, Any]:
    """The self-contained description of a trained model (``kind``: the data's transform family)."""
    from dataclasses import asdict

    return {
        "format": FORMAT,
        "arch": net.name,
        "source": net.source,
        "arch_options": arch_options(net),
        "head": asdict(net.head_config),
        "num_classes": net.num_classes,
        "classes": list(classes),
        "kind": kind,
        "preprocessing": net.preprocessing.to_dict(),
        # The weights the body started from, as loaded: the config's DEFAULT names no weights.
        "pretrained": net.weights_name,
        # Contiguous: a network trained channels-last saves the standard layout all the same.
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
    }


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary file in the same folder, then rename)."""
    return write_atomically(path, lambda f: torch.save(payload, f))


def read(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``), with clear errors."""
    path = Path(path)
    if path.is_dir():  # a run folder: take its best model
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.is_file():
        raise HeadstartError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise HeadstartError(f"cannot read checkpoint {path}: not a readable headstart checkpoint (truncated, "
                                 "corrupt or not a torch file)") from None
        raise HeadstartError(
            f"cannot read checkpoint {path}: it holds code or Python objects that headstart will not load (a "
            "headstart checkpoint holds only tensors and plain data)") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file, whatever the reason
        # torch's own message runs to many lines and suggests weights_only=False, which would be
        # unsafe advice for a file of unknown origin; keep its first line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadstartError(
            f"cannot read checkpoint {path}: not a readable headstart checkpoint (truncated, corrupt or "
            f"not a torch file; {first[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HeadstartError(f"{path} is not a headstart checkpoint (it has no '{FORMAT}' record)")
    return ckpt


REQUIRED = ("arch", "head", "num_classes", "classes", "preprocessing", "state_dict")


def load_network(path_or_ckpt: str | Path | dict[str, Any]) -> tuple[Network, dict[str, Any]]:
    """Rebuild the trained network from a checkpoint alone (no download, no other file).

    A checkpoint that carries the format tag but is damaged (fields missing, classes that do not
    match the outputs, weights of another architecture) is a :class:`HeadstartError` naming the
    file and what is wrong, never a KeyError or a shape mismatch from deep inside torch.
    """
    from headstart.models.backbones import build_network

    where = "the checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read(path_or_ckpt)
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise HeadstartError(f"{where} is a damaged headstart checkpoint: it has no {', '.join(missing)}")
    if not isinstance(ckpt["classes"], list) or len(ckpt["classes"]) != ckpt["num_classes"]:
        raise HeadstartError(f"{where} is a damaged headstart checkpoint: {len(ckpt['classes'])} class names for "
                             f"{ckpt['num_classes']} outputs")
    try:
        pre = Preprocessing.from_dict(ckpt["preprocessing"])
        # A timm model is named with its source: several timm names are torchvision names too.
        name = f"timm:{ckpt['arch']}" if ckpt.get("source") == "timm" else ckpt["arch"]
        net = build_network(name, "none", input_size=pre.crop, arch=ckpt.get("arch_options") or {})
        net.replace_head(ckpt["num_classes"], from_dict(HeadConfig, ckpt["head"]))
        net.load_state_dict(ckpt["state_dict"])
    except HeadstartError as e:
        raise HeadstartError(f"{where} cannot be rebuilt: {e}") from None
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise HeadstartError(f"{where} is a damaged headstart checkpoint: its weights do not fit its architecture "
                             f"{ckpt['arch']} ({first})") from None
    net.preprocessing = pre
    # A resumed run writes checkpoints of this network: they keep the record (older files have none).
    net.weights_name = str(ckpt.get("pretrained", "not recorded"))
    net.eval()
    return net, ckpt
