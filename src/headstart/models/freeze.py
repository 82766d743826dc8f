"""Freezing as small named functions over depth groups, names or patterns, with a BatchNorm policy.

A freeze spec says what does *not* train:

- ``body``: every depth group (only the head trains) — the seed's choice;
- ``none``: nothing is frozen;
- ``first:K`` (or just ``K``): the first K depth groups;
- comma-separated glob patterns over parameter names (``body.features.0.*,body.features.1.*``).

Frozen parameters get ``requires_grad=False``. In train mode, :func:`apply_train_mode` then puts
every fully frozen depth group in eval mode under the default ``frozen`` BatchNorm policy, so
BatchNorm running statistics do not drift and dropout/stochastic depth do not perturb features
that should be fixed (which is also what makes cached features exact).

Example::

    >>> from headstart.models.backbones import build_network
    >>> net = build_network("resnet18", weights="none", num_classes=3)
    >>> freeze(net, "first:2")
    >>> [g for g, state in trainable_state(net).items() if state == "frozen"]
    ['stem', 'layer1']
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.errors import HeadstartError
from headstart.models.network import Network


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def freeze(net: Network, spec: str = "body") -> None:
    """Make everything trainable, then freeze what ``spec`` names (see the module docstring)."""
    set_requires_grad(net, True)
    spec = (spec or "none").strip()
    if spec == "none":
        return
    if spec == "body":
        set_requires_grad(net.body, False)
        return
    k = _first_k(spec)
    if k is not None:
        if not 0 <= k <= len(net.groups):
            raise HeadstartError(f"cannot freeze the first {k} groups: {net.name} has {len(net.groups)} depth groups")
        frozen = {g.name for g in net.groups[:k]}
        for gname, params in net.group_params():
            if gname in frozen:
                for _, p in params:
                    p.requires_grad_(False)
        return
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    matched = 0
    for name, p in net.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            matched += 1
    if not matched:
        raise HeadstartError(
            f"freeze pattern(s) {spec!r} match no parameter; names look like "
            f"{next(iter(n for n, _ in net.named_parameters()))!r} (see `headstart inspect`)"
        )


def _first_k(spec: str) -> int | None:
    s = spec.removeprefix("first:")
    return int(s) if s.isdigit() else None


def unfreeze_last(net: Network, k: int | str) -> str:
    """The freeze spec that leaves the last ``k`` depth groups (or ``all``) and the head trainable."""
    if str(k) == "all":
        return "none"
    try:
        k = int(k)
    except ValueError:
        raise HeadstartError(f"finetune_unfreeze must be `all` or a number of depth groups, got {k!r}") from None
    if k < 0:
        raise HeadstartError(f"cannot unfreeze {k} groups")
    return f"first:{max(0, len(net.groups) - k)}"


def trainable_state(net: Network) -> dict[str, str]:
    """``trainable``, ``frozen`` or ``partial`` for each depth group and the head."""
    out = {}
    for gname, params in net.group_params():
        flags = {p.requires_grad for _, p in params}
        out[gname] = "trainable" if flags == {True} else "frozen" if flags == {False} else "partial" if flags else "-"
    return out


def bn_mode(net: Network) -> dict[str, str]:
    """What the BatchNorm layers of each group do in train mode: ``train``, ``eval``, ``mixed`` or ``-``."""
    was = net.training
    net.train()
    out = {}
    for g in net.groups:
        modes = {m.training for mod in net.group_modules(g) for m in mod.modules() if isinstance(m, _BatchNorm)}
        out[g.name] = _mode_word(modes)
    modes = {m.training for m in net.head.modules() if isinstance(m, _BatchNorm)}
    out["head"] = _mode_word(modes)
    net.train(was)
    return out


def _mode_word(modes: set[bool]) -> str:
    return "-" if not modes else "train" if modes == {True} else "eval" if modes == {False} else "mixed"


def count_params(net: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in net.parameters())
    return total, sum(p.numel() for p in net.parameters() if p.requires_grad)
