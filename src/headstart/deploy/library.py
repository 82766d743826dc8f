"""Plain weights under the original library's key names, and the plain model they load into.

A :class:`~headstart.network.Network` keeps its backbone as ``body`` and its classifier as
``head``: for torchvision and timm models the body *is* the library's model with its classifier
set to ``Identity`` (SqueezeNet's body holds its ``features``), and the head is what sat at the
classifier's place. So ``body.X`` maps back to ``X`` and ``head.K`` to ``<classifier>.K``.

Where headstart's head is the library's own classifier (``--head replace``, or a ``linear`` head
where the library's classifier is one Linear after parameter-free layers), the weights load
strictly into ``torchvision.models.get_model(name, num_classes=N)`` / ``timm.create_model(name,
num_classes=N)``. Otherwise (an ``mlp`` head, a ``linear`` head on ConvNeXt, whose classifier
also holds a LayerNorm) the head is recorded layer by layer, and the plain model loads the
weights strictly once its classifier is replaced by that head: :func:`head_code` writes the line.
Either way the mapping is checked by running the plain model beside the network.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from headstart.errors import HeadstartError
from headstart.models import Network

# Layers a headstart head is made of (network.build_mlp_head), with the arguments that rebuild them.
_LAYER_ARGS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "BatchNorm1d": ("num_features",),
    "Flatten": ("start_dim",),
    "AdaptiveAvgPool2d": ("output_size",),
    "Dropout": ("p",),
    "ReLU": (), "GELU": (), "SiLU": (), "Tanh": (), "LeakyReLU": ("negative_slope",),
}


def library_spec(net: Network) -> dict[str, Any]:
    """How to build the plain library model of ``net``: library, name, builder arguments, classifier path."""
    kwargs: dict[str, Any] = {}
    if net.source == "timm":  # the body is the timm model itself, its classifier reset to Identity
        path = net.body.pretrained_cfg.get("classifier", "classifier")
        return {"package": "timm", "name": net.name, "num_classes": net.num_classes, "kwargs": kwargs,
                "classifier": path}
    from headstart.models import families

    kwargs.update({k: bool(getattr(net.body, k)) for k in ("transform_input", "aux_logits") if hasattr(net.body, k)})
    if getattr(net.body, "image_size", 224) != 224:  # ViT at another input size
        kwargs["image_size"] = int(net.body.image_size)
    if net.name.startswith("maxvit") and net.preprocessing.crop != 224:
        kwargs["input_size"] = [net.preprocessing.crop] * 2
    model = _plain(net.name, net.num_classes, kwargs, "torchvision")
    fam = families.family_of(model)
    if fam is None:
        raise HeadstartError(f"no key mapping for {net.name} ({type(model).__name__}): export to onnx or torchscript")
    return {"package": "torchvision", "name": net.name, "num_classes": net.num_classes, "kwargs": kwargs,
            "classifier": fam.head}


def _plain(name: str, num_classes: int, kwargs: dict[str, Any], package: str) -> nn.Module:
    if package == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    from torchvision.models import get_model

    if "input_size" in kwargs:
        kwargs = kwargs | {"input_size": tuple(kwargs["input_size"])}
    return get_model(name, weights=None, num_classes=num_classes, **kwargs)


def library_weights(net: Network) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict under the library's key names, the spec to put in config.json)``.

    The spec's ``head`` is ``library`` when the weights load into the unmodified library model,
    else ``custom``, with ``head_layers`` describing the classifier to put at ``classifier``.
    The mapping is checked on a random batch (eval mode) before it is returned.
    """
    spec = library_spec(net)
    own = _as_library_keys(net, spec["classifier"])
    if net.head_config.kind in ("replace", "linear"):
        plain = build_library_model(spec | {"head": "library"})
        state = own if net.head_config.kind == "replace" else _onto_library_head(own, plain, spec["classifier"])
        if state is not None and _same_model(net, plain, state):
            return state, spec | {"head": "library"}
        if net.head_config.kind == "replace":
            raise HeadstartError(f"internal: {net.name}'s weights do not map onto the plain {spec['package']} model")
    spec = spec | {"head": "custom", "head_layers": head_layers(net.head)}
    plain = build_library_model(spec)
    if not _same_model(net, plain, own):
        raise HeadstartError(f"internal: {net.name}'s weights with a custom head do not rebuild the model")
    return own, spec


def _as_library_keys(net: Network, classifier: str) -> dict[str, torch.Tensor]:
    state = {}
    for k, v in net.state_dict().items():
        if k.startswith("body."):
            state[k[5:]] = v.detach().cpu().clone()
        elif k.startswith("head."):
            state[f"{classifier}.{k[5:]}"] = v.detach().cpu().clone()
    return state


def _onto_library_head(own: dict[str, torch.Tensor], plain: nn.Module,
                       classifier: str) -> dict[str, torch.Tensor] | None:
    """A ``linear`` head's one Linear moved onto the library classifier's only parameterised layer, if it has one."""
    target = plain.state_dict()
    head_keys = [k for k in target if k == classifier or k.startswith(classifier + ".")]
    ours = [k for k in own if k.startswith(classifier + ".")]
    layers = {k.rsplit(".", 1)[0] for k in head_keys}
    if len(layers) != 1 or {k.rsplit(".", 1)[1] for k in ours} != {k.rsplit(".", 1)[1] for k in head_keys}:
        return None
    (layer,) = layers
    state = {k: v for k, v in own.items() if k not in ours}
    for k in ours:
        state[f"{layer}.{k.rsplit('.', 1)[1]}"] = own[k]
    return state


@torch.no_grad()
def _same_model(net: Network, plain: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` loads strictly into ``plain`` and gives the network's logits."""
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    ref = copy.deepcopy(net).cpu().eval()
    size = net.preprocessing.crop
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    a, b = ref(x), plain.eval()(x)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max()))))


# ---------------------------------------------------------------------- custom heads


def head_layers(head: nn.Module) -> list[dict[str, Any]]:
    """A headstart head as a list of ``{"type": ..., args...}``, enough to rebuild it."""
    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    out = []
    for m in modules:
        kind = type(m).__name__
        if kind not in _LAYER_ARGS:
            raise HeadstartError(f"cannot describe a head layer of type {kind}: export to onnx or torchscript")
        layer: dict[str, Any] = {"type": kind}
        for a in _LAYER_ARGS[kind]:
            v = getattr(m, a)
            layer[a] = (v is not None) if a == "bias" else v
        out.append(layer)
    return out


def build_head(layers: list[dict[str, Any]]) -> nn.Sequential:
    return nn.Sequential(*[getattr(nn, layer["type"])(**{k: v for k, v in layer.items() if k != "type"})
                           for layer in layers])


def head_code(layers: list[dict[str, Any]]) -> str:
    """The Python expression that builds the head (``torch.nn.Sequential(...)``), for the model card."""
    parts = []
    for layer in layers:
        args = ", ".join(f"{k}={v!r}" for k, v in layer.items() if k != "type")
        parts.append(f"torch.nn.{layer['type']}({args})")
    return f"torch.nn.Sequential({', '.join(parts)})"


def build_library_model(meta: dict[str, Any]) -> nn.Module:
    """The plain torchvision/timm model an export's weights load into (its classifier replaced if custom)."""
    spec = meta["library"] if isinstance(meta.get("library"), dict) else meta
    model = _plain(spec["name"], int(spec["num_classes"]), dict(spec.get("kwargs") or {}), spec["package"])
    if spec.get("head") == "custom":
        parent, _, leaf = spec["classifier"].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, build_head(spec["head_layers"]))
    return model.eval()
