"""The console's lines for a fit: each stage's announcement, each epoch's result, and what fine-tuning did."""

from __future__ import annotations

import math
from typing import Any

from headstart.config import StageConfig, TrainConfig
from headstart.training.optim import StagePlan, stage_climb

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
    if plan.average and plan.epochs:
        length += f", validating a moving average of the weights over {plan.average:.0%} of its steps"
    step = SEED_STEPS.get(plan.name, "")
    return [f"\n== {step}stage {si + 1}/{n}: {plan.name} ({plan.what}) — {length}, BatchNorm {plan.bn}",
            f"   frozen: {', '.join(frozen) or 'nothing'}",
            f"   training: {', '.join(live)}  ({plan.trainable:,} of {plan.total:,} parameters)"]


def climb_line(stage: StageConfig, steps: int, tc: TrainConfig) -> str | None:
    """The console's line for a stage too short to climb to its full rate (None: it reaches it)."""
    warm, peak = stage_climb(stage, tc, steps)
    if peak >= 1 or tc.scheduler == "constant":  # a constant schedule has no warm-up at all
        return None
    return (f"   warm-up: {warm} of its {steps} steps, short of the {stage.warmup_steps} the climb to the full rate "
            f"takes: the rate peaks at {peak:.0%} of lr")


def epoch_line(row: dict[str, Any], stage: StageConfig) -> str:
    """The console's line for one epoch (or for the solve that ends a solving stage)."""
    mark = "  *best*" if row.get("best") else ""
    what = "solved" if "solved" in row else f"epoch {row['epoch']}/{stage.epochs}"
    # With a weight average the validation numbers are the average's; the weights as trained follow.
    live = f" (averaged; as trained {row['val_acc_live']:.2%})" if "val_acc_live" in row else ""
    return (f"   {what}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}{live}  ({row['images_per_s']:.0f} img/s){mark}")


def outcome_lines(history: list[dict[str, Any]], classes: int) -> list[str]:
    """What the console adds after the last epoch when fine-tuning did harm: nothing when it did not.

    Best-checkpoint selection keeps such a run's ``best.pt`` at its best epoch, which would hide the
    harm; these lines say it. A training loss far above a uniform guess's (``ln classes``) is
    divergence that stayed finite (random weights fine-tuned at a pretrained network's rate reach 1e5).
    """
    first = [r for r in history if r.get("stage_index") == 0]
    later = [r for r in history if (r.get("stage_index") or 0) > 0]
    if not first or not later:
        return []
    out, base, end = [], first[-1]["val_acc"], later[-1]["val_acc"]
    worst = max(later, key=lambda r: r["train_loss"])
    if worst["train_loss"] > 10 * math.log(max(2, classes)):
        out.append(f"   fine-tuning diverged: its training loss reached {worst['train_loss']:.3g} in {worst['stage']} "
                   f"epoch {worst['epoch']} (a uniform guess scores {math.log(max(2, classes)):.2f}); lower "
                   "--finetune-lr, or check that the weights are pretrained")
    if end < base - 0.005:
        best = max(history, key=lambda r: r["val_acc"])
        out.append(f"   fine-tuning ended at {end:.2%}, below the {first[-1]['stage']} stage's {base:.2%}: best.pt "
                   f"holds the best epoch ({best['stage']} epoch {best['epoch']}, {best['val_acc']:.2%})")
    return out
