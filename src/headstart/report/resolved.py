"""The report's config view as the run used it: values the run resolved filled in and marked.

``config.yaml`` is the config as asked: ``input_size: null`` (the weights' size, or 64 px for the
digits), ``weights: DEFAULT``, ``lr: auto``. What those became is recorded elsewhere: the
checkpoint's preprocessing (the input size) and its ``pretrained`` entry (the weights as loaded),
the history's ``base_lr`` (a rate the range test chose). This module fills them in, each with a
comment saying so, and marks the automatic choices the run folder does not record, so that no
``null`` or ``auto`` reads as if it were the value used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

#: Settings left to the run whose choice no file in the run folder records (device, precision and
#: loader choices are made when training starts and are not saved).
UNRECORDED = ("data.workers", "data.in_memory", "data.batch_transforms", "train.precision",
              "train.channels_last", "train.micro_batch", "train.device")

NOT_RECORDED = "auto: the run folder does not record what the run chose"

# ``key: value`` in safe_dump's block style, optionally a list item (``- key: value``).
_LINE = re.compile(r"^(?P<lead> *)(?P<dash>- )?(?P<key>[A-Za-z_]\w*):(?: (?P<value>.*))?$")


def resolved_values(cfg: Any, ckpt: dict[str, Any], history: Sequence[dict[str, Any]]) -> dict[str, tuple[Any, str]]:
    """Dotted config paths -> (the value the run used, why it differs from the config), for the
    values ``cfg`` left to the run that the checkpoint ``ckpt`` or the ``history`` records."""
    filled: dict[str, tuple[Any, str]] = {}
    crop = (ckpt.get("preprocessing") or {}).get("crop")
    if cfg.model.input_size is None and isinstance(crop, int):
        filled["model.input_size"] = (crop, "resolved: the size the model was trained at (checkpoint)")
    loaded = ckpt.get("pretrained")
    if isinstance(loaded, str) and loaded not in ("", cfg.model.weights):
        filled["model.weights"] = (loaded, f"resolved: {cfg.model.weights}, as loaded (checkpoint)")
    if not cfg.train.stages:  # the two phases: stage 0 trains at train.lr, stage 1 at finetune_lr
        for index, key in ((0, "lr"), (1, "finetune_lr")):
            used = [r.get("base_lr") for r in history if r.get("stage_index") == index]
            if getattr(cfg.train, key) == "auto" and used and isinstance(used[0], float):
                filled[f"train.{key}"] = (used[0], "resolved: chosen by the learning-rate range test")
    return filled


def annotate_config(text: str, filled: dict[str, tuple[Any, str]], unrecorded: Sequence[str] = UNRECORDED) -> str:
    """``text`` (a config as YAML) with each ``filled`` value put in and commented, and each
    ``unrecorded`` setting whose value is ``null`` or ``auto`` commented as such.

    Only mapping keys are followed (``model.input_size``); entries inside lists are left alone.
    """
    out, stack = [], []  # stack: (indent, key) of the mappings the line is inside
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            out.append(line)
            continue
        indent = len(m["lead"]) + (2 if m["dash"] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m["dash"]:  # keys inside a list item belong to no dotted path
            stack.append((indent - 1, "-"))
        path = ".".join([k for _, k in stack] + [m["key"]])
        value = m["value"]
        if value is None or value == "":
            stack.append((indent, m["key"]))
        elif path in filled:
            new, why = filled[path]
            line = f"{m['lead']}{m['dash'] or ''}{m['key']}: {yaml_scalar(new)}  # {why}"
        elif path in unrecorded and value in ("null", "auto"):
            line = f"{line}  # {NOT_RECORDED}"
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def yaml_scalar(value: Any) -> str:
    """``value`` as YAML writes it in a block mapping (quoted only where YAML needs it)."""
    import yaml

    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]
