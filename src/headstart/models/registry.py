"""The backbone source registry: each source (torchvision, timm) is one module and one decorator.

A source knows which model names it owns, lists them (with parameter counts, input sizes and
whether weights are on this machine) and builds a :class:`~headstart.models.network.Network`.
To add a source, write a module with a class decorated ``@register_source`` and import it in
:mod:`headstart.models.backbones`; nothing else needs editing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from headstart.models.network import Network


@dataclass
class BackboneInfo:
    """One buildable backbone, as ``headstart models`` lists it."""

    name: str
    source: str
    params: int | None
    input_size: int
    weights: list[str]
    offline: bool = False  # pretrained weights are on this machine (cached or packaged)


class Source(Protocol):
    name: str
    priority: int  # lower is asked first when a name belongs to several sources

    def owns(self, model: str) -> bool: ...

    def names(self) -> list[str]: ...

    def info(self, pattern: str) -> list[BackboneInfo]: ...

    def build(self, model: str, weights: str, input_size: int | None, arch: dict[str, Any]) -> Network: ...


#: Sources by name, in the order names are looked up (the first that owns a name builds it).
SOURCES: dict[str, Source] = {}


def register_source(cls: type) -> type:
    """Class decorator: instantiate a source and add it to :data:`SOURCES`, kept in priority order
    (import order must not decide whether ``vgg11`` is torchvision's or timm's)."""
    source = cls()
    SOURCES[source.name] = source
    ordered = sorted(SOURCES.values(), key=lambda s: s.priority)
    SOURCES.clear()
    SOURCES.update((s.name, s) for s in ordered)
    return cls
