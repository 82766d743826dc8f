"""The console's lines for a fit: each stage's announcement and each epoch's result."""

from __future__ import annotations

from typing import Any

from headstart.config import StageConfig
from headstart.training.optim import StagePlan

# The seed's last two steps, continuing the numbers the job's narration gives steps 1-4.
SEED_STEPS = {"head": "5. train the classifier, ", "finetune": "6. fine-tune, "}


def stage_lines(plan: StagePlan, si: int, n: int) -> list[str]:
    """The console's announcement of stage ``si`` of ``n``: what it freezes and trains, at which rate."""
    frozen = [g for g, s in plan.states.items() if s == "frozen"]
    live = [g for g, s in plan.states.items() if s != "frozen"]
    decay = f" (layer decay {plan.layer_decay:g})" if plan.layer_decay != 1.0 else ""
    length = f"{plan.epochs} epoch(s), lr {plan.lr}{decay}"
    if plan.solve:
        solved = "final layer solved by L-BFGS, its weight decay by cross-validation on the training split"
        length = solved if plan.epochs == 0 else f"{length}, then the {solved}"
    step = SEED_STEPS.get(plan.name, "")
    return [f"\n== {step}stage {si + 1}/{n}: {plan.name} ({plan.what}) — {length}, BatchNorm {plan.bn}",
            f"   frozen: {', '.join(frozen) or 'nothing'}",
            f"   training: {', '.join(live)}  ({plan.trainable:,} of {plan.total:,} parameters)"]


def epoch_line(row: dict[str, Any], stage: StageConfig) -> str:
    """The console's line for one epoch (or for the solve that ends a solving stage)."""
    mark = "  *best*" if row.get("best") else ""
    what = "solved" if "solved" in row else f"epoch {row['epoch']}/{stage.epochs}"
    return (f"   {what}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  ({row['images_per_s']:.0f} img/s){mark}")
