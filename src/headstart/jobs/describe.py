"""Understand a model: its body and head, its depth groups, and what each stage will train.

:func:`inspect_model` is what ``headstart inspect`` prints; it trains nothing.
"""

from __future__ import annotations

from torch import nn

from headstart.config import RunConfig
from headstart.models.backbones import build_network
from headstart.models.freeze import bn_mode, count_params, freeze, trainable_state
from headstart.models.network import Network
from headstart.training.optim import apply_stage, group_lrs, resolve_stages


def inspect_model(cfg: RunConfig, num_classes: int | None = None) -> str:
    """The body, the head, a depth-group table with the head stage applied, and the stage plan."""
    net = build_network(cfg.model.name, cfg.model.weights, input_size=cfg.model.input_size)
    if num_classes is not None:
        net.replace_head(num_classes, cfg.head)
    freeze(net, cfg.train.freeze)
    net.bn_policy = "frozen"
    out = [
        f"{net.name} ({net.source}, weights {cfg.model.weights}), input {net.preprocessing.crop}px, "
        f"mean {tuple(round(v, 3) for v in net.preprocessing.mean)}, std "
        f"{tuple(round(v, 3) for v in net.preprocessing.std)}",
        "",
        "== body (feature extractor)",
        body_text(net),
        "",
        f"== head (classifier, {net.head_config.kind if num_classes else 'pretrained'})",
        str(net.head),
        "",
        f"== depth groups (freeze: {cfg.train.freeze})",
        group_table(net),
    ]
    if num_classes is not None:
        out += ["", "== training plan (dry run: nothing trains)", plan_text(net, cfg)]
    return "\n".join(out)


def body_text(net: Network) -> str:
    """The body's parts, leaving out the Identity that stands where the head was."""
    parts = [f"({n}): {m}" for n, m in net.body.named_children() if not isinstance(m, nn.Identity)]
    return "\n".join(parts)


def group_table(net: Network) -> str:
    states, modes = trainable_state(net), bn_mode(net)
    rows = [("group", "parameters", "trainable", "state", "BatchNorm in training")]
    for gname, params in net.group_params():
        n = sum(p.numel() for _, p in params)
        t = sum(p.numel() for _, p in params if p.requires_grad)
        rows.append((gname, f"{n:,}", f"{t:,}", states[gname], modes.get(gname, "-")))
    total, trainable = count_params(net)
    rows.append(("total", f"{total:,}", f"{trainable:,}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if 0 < j < 3 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_text(net: Network, cfg: RunConfig) -> str:
    """Every stage of the schedule: epochs, and each group's state, learning rate and BatchNorm mode."""
    lines = []
    for i, stage in enumerate(resolve_stages(cfg.train, net), 1):
        apply_stage(net, stage)
        lr = stage.lr if stage.lr is not None else cfg.train.lr
        auto = lr == "auto"
        lrs = group_lrs(net, stage, 1.0 if auto else float(lr))
        states, modes = trainable_state(net), bn_mode(net)
        lines.append(f"stage {i}: {stage.name}, {stage.epochs} epoch(s), freeze {stage.freeze}, BatchNorm {stage.bn}")
        lines.append(f"    feature cache: {cache_plan(net, cfg)}")
        for g in [*(g.name for g in net.groups), "head"]:
            rate = "frozen" if states[g] == "frozen" else f"lr auto×{lrs[g]:.3g}" if auto else f"lr {lrs[g]:.3g}"
            lines.append(f"    {g:<14} {rate:<14} BatchNorm {modes.get(g, '-')}")
    return "\n".join(lines)


def cache_plan(net: Network, cfg: RunConfig) -> str:
    """What the stage, as frozen now, would read from the feature cache (see ``engine.StageInputs``)."""
    from headstart.training.cache import cacheable_part

    part, cut = cacheable_part(net, cfg.cache)
    if part == "body":
        return "the whole body's features, computed once"
    if part == "prefix" and net.chain is not None:
        return f"the frozen first {cut} of {len(net.chain)} body steps (up to {net.chain[cut - 1].name}), computed once"
    if not cfg.cache.enabled:
        return "off"
    if net.bn_policy == "train":
        return "none (frozen BatchNorm uses batch statistics)"
    return "none (images go through the whole network every epoch)"
