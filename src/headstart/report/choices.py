"""What training chose by itself, as the report tells it: the solved head's weight decay, the --budget plan."""

from __future__ import annotations

from headstart.report.markup import duration, esc, html_table, pct
from headstart.report.run import RunRecord


def budget_notes(run: RunRecord) -> str:
    """The --budget plan: every candidate with its measured cost, the one chosen, and what it ran."""
    plan = run.summary.get("budget_plan")
    if not isinstance(plan, dict):
        return ""
    rows = []
    for i, c in enumerate(plan.get("candidates") or []):
        name = "the whole network" if c["groups"] >= c["of"] else f"the last {c['groups']} of {c['of']} groups"
        rows.append([name + (" (chosen)" if i == plan.get("chosen") else ""), duration(c["extract_s"]),
                     duration(c["epoch_s"]) + (" (pooled)" if c.get("pooled") else ""), str(c["epochs"])])
    ran = sum(1 for r in run.history if r.get("stage") == "finetune")
    head = (f"<h3>Budget</h3><p>Budget {duration(plan['budget_s'])}; {duration(plan['left_s'])} were left after "
            f"the head stage. Each fine-tuning plan was timed over a few steps; the deepest that fits 8 epochs "
            f"runs (else the deepest that fits 3, else the one that fits the most), stopping when validation "
            f"stops improving past its warm-up and half of its decay. A deeper plan never trains faster than a "
            f"shallower one: where the timings said so, their estimates were pooled (averaged). "
            f"Fine-tuning ran {ran} epoch(s); the whole job took {duration(run.summary.get('wall_seconds'))}."
            f"{_refit_text(plan)}</p>")
    return head + html_table(["plan", "one-off extraction", "per epoch", "epochs that fit"], rows, "budget")


def _refit_text(plan: dict) -> str:
    """What the planned stage's first epoch(s) changed: their real times set the stage's length again."""
    refit = plan.get("refit")
    if not isinstance(refit, dict):
        return ""
    change = (f"the stage was set to {refit['epochs']} epoch(s) instead of {refit['planned']}"
              if refit["epochs"] != refit["planned"] else "the planned length stood")
    return (f" After {refit['after']} epoch(s), an epoch took {duration(refit['epoch_s'])}: with that real time "
            f"{change}, its schedule refitted at the step it had reached.")


def solved_notes(run: RunRecord) -> str:
    """What the head solver chose in each solving stage, and the cross-validated score behind the choice."""
    notes = []
    for r in run.history:
        s = r.get("solved")
        if not isinstance(s, dict):
            continue
        tried = ", ".join(f"{k}: {pct(v)}" for k, v in (s.get("scores") or {}).items())
        notes.append(f"<p>Stage <b>{esc(str(r.get('stage')))}</b>: the head's final layer was solved by L-BFGS; "
                     f"weight decay <b>{s.get('weight_decay', 0):g}</b> was chosen by {s.get('folds')}-fold "
                     f"cross-validation on the training split alone, cross-validated accuracy "
                     f"<b>{pct(s.get('cv_accuracy'))}</b> (loss {s.get('cv_loss', float('nan')):.3f}); "
                     f"validation accuracy afterwards {pct(r.get('val_acc'))}. Tried: {esc(tried)}.</p>")
    return "".join(notes)
