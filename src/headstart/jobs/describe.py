"""Understand a model: its body and head, its depth groups, and what each stage will train.

:func:`inspect_model` is what ``headstart inspect`` prints; it trains nothing.
"""

from __future__ import annotations

from torch import nn

from headstart.config import RunConfig
from headstart.models.backbones import build_network
from headstart.models.freeze import bn_mode, count_params, freeze, trainable_state
from headstart.models.network import Network
from headstart.training.optim import describe_stage, resolve_stages


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
        plan = describe_stage(net, stage, cfg)
        auto = plan.lr == "auto"
        length = f"{plan.epochs} epoch(s)" + (", then the final layer solved" if plan.solve else "")
        lines.append(f"stage {i}: {plan.name}, {length}, freeze {plan.freeze}, BatchNorm {plan.bn}")
        lines.append(f"    feature cache: {plan.cache}")
        for g in [*(g.name for g in net.groups), "head"]:
            lr = plan.lrs[g]
            rate = "frozen" if plan.states[g] == "frozen" else f"lr auto×{lr:.3g}" if auto else f"lr {lr:.3g}"
            lines.append(f"    {g:<14} {rate:<14} BatchNorm {plan.bn_modes.get(g, '-')}")
    return "\n".join(lines)
