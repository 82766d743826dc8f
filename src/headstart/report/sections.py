"""The report's sections as a registry: each is one function, registered in page order with its heading.

To add a section, write ``@register(key, heading)`` above a function taking a :class:`Page` and
returning its HTML (or "" to leave it out); nothing else needs editing."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.errors import HeadstartError

if TYPE_CHECKING:  # pragma: no cover
    from headstart.training.optim import StagePlan
from headstart.report.choices import budget_notes, solved_notes
from headstart.report.figures import (
    EXAMPLES,
    confusion_figure,
    examples_figure,
    figure_png,
    learning_curves_figure,
    quiet,
)
from headstart.report.markup import Cell, count_text, duration, esc, figure_html, html_table, kv_list, pct, share
from headstart.report.resolved import annotate_config, resolved_values
from headstart.report.run import RunRecord, stage_plans


@dataclass
class Page:
    """What every section may draw on: the run, its predictions (or why there are none), and the
    folder the figures go to."""

    run: RunRecord
    interp: Any
    problem: str
    out: Path


#: Section headings by key, in page order; filled by :func:`register`.
SECTIONS: dict[str, str] = {}
#: The section writers, in page order.
WRITERS: list[tuple[str, Callable[[Page], str]]] = []


def register(key: str, heading: str) -> Callable[[Callable[[Page], str]], Callable[[Page], str]]:
    """Add a section to the page, after those registered before it."""
    def add(fn: Callable[[Page], str]) -> Callable[[Page], str]:
        SECTIONS[key] = heading
        WRITERS.append((key, fn))
        return fn
    return add


def render_sections(page: Page) -> str:
    """Every registered section's HTML, in order, leaving out those with nothing to show."""
    return "\n".join(html for html in (fn(page) for _, fn in WRITERS) if html)


def section_html(key: str, inner: str, note: str = "") -> str:
    return (f'<section id="{key}"><h2>{esc(SECTIONS[key])}</h2>'
            + (f'<p class="note">{note}</p>' if note else "") + inner + "</section>")


def unavailable(key: str, problem: str) -> str:
    return section_html(key, "", f"Not available: {esc(problem or 'no predictions were made')}.")


def _summary_section(run: RunRecord, interp: Any) -> str:
    s, cfg = run.summary, run.cfg
    model = s.get("model") or (cfg.model.name if cfg else "?")
    weights = s.get("weights") or (cfg.model.weights if cfg else "?")
    loaded = s.get("weights_loaded")
    if loaded and loaded != weights:
        weights = f"{weights} = {loaded}"  # DEFAULT as it resolved on the machine that trained
    pairs = [
        ("run folder", run.path.name),
        ("model", f"{model} (weights {weights})"),
        ("data", s.get("data") or (cfg.data.source if cfg else "?")),
        ("classes", len(s.get("classes") or (interp.classes if interp else []))),
        ("epochs", s.get("epochs", len(run.history))),
        ("best validation accuracy", pct(s.get("best_val_accuracy"))),
        ("final validation accuracy", pct(s.get("final_val_accuracy"))),
        ("final validation top-5", pct(s.get("final_val_top5"))),
        ("wall time", duration(s.get("wall_seconds"))),
    ]
    if interp is not None:
        r = interp.report
        scores = f"top-1 {r.top1:.2%}, top-5 {r.top5:.2%}, loss {r.loss:.4f}"
        what = f"{len(interp)} {interp.split} images of {interp.source}"
        pairs.append(("this report's predictions", f"{what}: {scores}"))
    if not run.summary:
        pairs.append(("status", "no summary.json: the run has not finished"))
    pairs.append(("report written", time.strftime("%Y-%m-%d %H:%M:%S")))
    return section_html("summary", kv_list(pairs))


def _curves_section(run: RunRecord, out: Path) -> str:
    history = [r for r in run.history if "global_epoch" in r]
    if not history:
        return section_html("curves", "", "No epochs were logged (metrics.jsonl is missing or empty).")
    with quiet():
        png = figure_png(learning_curves_figure(history, run.steps))
    if run.steps is not None:
        rates = ("each depth group's learning rate at every optimizer step, from the run's TensorBoard events "
                 f"({run.steps.steps_per_epoch:g} steps per epoch).")
    else:  # the epoch rows hold only each epoch's first rate: say what is missing, and why
        rates = (f"each depth group's learning rate at the start of each epoch only, since {run.steps_note}; "
                 "warm-up and decay within epochs are not shown.")
    cap = ("Loss and accuracy per epoch; dashed lines separate the stages (named above each plot); the star "
           f"is the best validation accuracy. Below: {esc(rates)}")
    return section_html("curves", figure_html(png, out / "learning_curves.png", "learning curves", cap))


def _confusion_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return unavailable("confusion", problem)
    with quiet():
        png = figure_png(confusion_figure(interp))
    pairs = interp.most_confused(8)
    confused = ("Most confused: " + "; ".join(f"{esc(t)} → {esc(p)} ({n})" for t, p, n in pairs) + "."
                ) if pairs else "No confusions: every image was classified correctly."
    cap = f"Rows: true class; columns: predicted class. {confused}"
    return section_html("confusion", figure_html(png, out / "confusion_matrix.png", "confusion matrix", cap))


def _per_class_section(interp: Any, problem: str) -> str:
    if interp is None:
        return unavailable("per-class", problem)
    cm = interp.confusion()
    rows = []
    for s in interp.per_class():
        off = cm[s.index].clone()
        off[s.index] = 0
        j = int(off.argmax())
        confused = f"{interp.classes[j]} ({int(off[j])})" if int(off[j]) > 0 else "–"
        bar = Cell(f'<td class="num"><span class="bar" style="width:{s.f1 * 100:.0f}%"></span>'
                    f'<span class="val">{s.f1:.3f}</span></td>')
        rows.append([s.name, f"{s.precision:.3f}", f"{s.recall:.3f}", bar, s.support, confused])
    r = interp.report
    note = (f"Top-1 {r.top1:.2%}, top-5 {r.top5:.2%} on {sum(r.support)} images; "
            "worst F1 first; classes with no images here (support 0) come last.")
    header = ["class", "precision", "recall", "F1", "support", "most often mistaken for"]
    table = html_table(header, rows, "scores")
    return section_html("per-class", table, note)


def _examples_table(interp: Any, preds: Sequence[Any]) -> str:
    root = str(interp.source).rstrip("/") + "/"

    def name(p: Any) -> str:
        return p.description.removeprefix(root)

    if preds and preds[0].correct:
        rows = [[k + 1, name(p), p.true, f"{p.confidence:.1%}", p.runner_up or "–",
                 f"{p.runner_up_probability:.1%}"] for k, p in enumerate(preds)]
        header = ["#", "image", "class", "confidence", "runner-up", "runner-up probability"]
        return html_table(header, rows, "examples")
    rows = [[k + 1, name(p), p.true, p.predicted, f"{p.confidence:.1%}", f"{p.true_probability:.1%}"]
            for k, p in enumerate(preds)]
    return html_table(["#", "image", "true", "predicted", "confidence", "P(true class)"], rows, "examples")


def _examples_section(key: str, interp: Any, problem: str, out: Path, preds: Sequence[Any], file: str,
                      note: str) -> str:
    if interp is None:
        return unavailable(key, problem)
    if not preds:
        return section_html(key, "", esc(note))
    with quiet():
        png = figure_png(examples_figure(interp, preds))
    fig = figure_html(png, out / file, SECTIONS[key].lower())
    return section_html(key, fig + _examples_table(interp, preds), esc(note))


def _mistakes_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return unavailable("mistakes", problem)
    preds = interp.top_mistakes(EXAMPLES)
    wrong = int((interp.preds != interp.targets).sum())
    note = (f"{count_text(wrong, 'wrong prediction')} in all; the {len(preds)} made with the highest confidence, "
            "most confident first. They are often mislabelled or truly ambiguous images."
            if wrong else f"No mistakes on the {len(interp)} images.")
    return _examples_section("mistakes", interp, problem, out, preds, "mistakes.png", note)


def _unsure_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return unavailable("unsure", problem)
    preds = interp.least_confident_correct(EXAMPLES)
    right = int((interp.preds == interp.targets).sum())
    note = (f"{count_text(right, 'right prediction')} in all; the {len(preds)} made with the lowest confidence, "
            "least confident first: the images the model is closest to getting wrong."
            if right else "No image was classified correctly.")
    return _examples_section("unsure", interp, problem, out, preds, "least_confident_correct.png", note)


def _trained_section(run: RunRecord) -> str:
    if run.checkpoint is None:
        return section_html("trained", _config_block(run), "No checkpoint yet: the model cannot be described, "
                            "and values left to the run (null, DEFAULT, auto) are shown as asked.")
    from headstart.config import RunConfig, from_dict
    from headstart.models import checkpoint
    from headstart.models.freeze import count_params

    try:
        net, ckpt = checkpoint.load_network(run.checkpoint)
        cfg = run.cfg or from_dict(RunConfig, ckpt.get("config") or {})
        plans = stage_plans(cfg, net)
    except HeadstartError as e:
        return section_html("trained", _config_block(run), f"The model cannot be described: {esc(e)}")
    group_sizes = {g: sum(p.numel() for _, p in ps) for g, ps in net.group_params()}
    total = count_params(net)[0]
    pre = net.preprocessing
    head, tc = group_sizes.get("head", 0), cfg.train
    schedule = (f"{len(plans)} stage(s), optimizer {tc.optimizer}, scheduler {tc.scheduler} (each stage's "
                f"warm-up in the table below), weight decay {tc.weight_decay}")
    facts = kv_list([
        ("model", f"{net.name} ({net.source})"),
        ("weights", _weights_text(cfg.model.weights, ckpt.get("pretrained"))),
        ("input", f"{pre.crop}×{pre.crop} px (resize {pre.resize}, {pre.interpolation})"),
        ("classifier", f"{net.head_config.kind} head, {net.num_classes} classes, {head:,} parameters"),
        ("parameters", f"{total:,} in all, {total - head:,} in the body's {len(net.groups)} depth groups"),
        ("schedule", schedule),
        ("wall time", f"{duration(run.summary.get('wall_seconds'))} (whole job)"),
    ])
    filled = resolved_values(cfg, ckpt, run.history)
    inner = facts + _stages_table(run, plans, total) + _freeze_map(plans, group_sizes) + _config_block(run, filled)
    return section_html("trained", inner)


def _stages_table(run: RunRecord, plans: Sequence[StagePlan], total: int) -> str:
    done = run.summary.get("stages") or {}
    ran = {}
    for r in run.history:
        ran[r.get("stage")] = ran.get(r.get("stage"), 0) + 1
    rows = []
    for p in plans:
        d = done.get(p.name) or {}
        lr = p.lr if isinstance(p.lr, str) else f"{p.lr:g}"
        if lr == "auto":  # chosen by the range test when the stage began: read it off the history
            used = [r.get("base_lr") for r in run.history if r.get("stage") == p.name]
            lr = f"auto ({used[0]:.3g})" if used and isinstance(used[0], float) else "auto"
        warmup = f"{p.warmup:.0%}" if p.epochs else "–"  # a solved-only stage takes no optimizer steps
        if p.epochs and p.warmup_steps:
            warmup += f", at most {p.warmup_steps} steps"
        average = f"{p.average:.0%}" if p.average and p.epochs else "–"
        rows.append([p.name, f"{ran.get(p.name, 0)} of {p.epochs + int(p.solve)}", lr, warmup, average,
                     f"{p.layer_decay:g}",
                     p.freeze, p.bn, f"{p.trainable:,} ({share(p.trainable, total)})",
                     duration(d.get("seconds")) if d else "–",
                     f"{d['images_per_s']:,.0f}" if d.get("images_per_s") else "–"])
    header = ["stage", "epochs run", "base lr", "warm-up", "weight average", "layer decay", "freeze", "BatchNorm",
              "trainable parameters", "training time", "images/s"]
    return ("<h3>Stages</h3>" + html_table(header, rows, "stages") + solved_notes(run) + budget_notes(run)
            + '<p class="note">A warm-up of at most N steps climbs to the full rate over N steps: a stage whose '
              "warm-up share is fewer steps peaks below its base rate. "
              "A stage with a weight average validates, saves and keeps a moving average of its "
              "weights over that share of its steps. Training time sums the epochs' training passes and the "
              "feature caching of a frozen body (validation not included); images/s is the last epoch's "
              "training throughput.</p>")


def _freeze_map(plans: Sequence[StagePlan], group_sizes: dict[str, int]) -> str:
    if not plans:
        return ""
    groups = list(plans[0].states)
    rows = []
    for g in groups:
        states = [p.states.get(g, "-") for p in plans]
        cells = [Cell(f'<td class="st-{esc(st)}">{esc(st)}</td>') for st in states]
        rows.append([g, f"{group_sizes.get(g, 0):,}", *cells])
    return ("<h3>Depth groups trained in each stage</h3>"
            + html_table(["depth group", "parameters", *[p.name for p in plans]], rows, "freeze"))


def _weights_text(asked: str, loaded: Any) -> str:
    return f"{asked} = {loaded}" if isinstance(loaded, str) and loaded not in ("", asked) else asked


def _config_block(run: RunRecord, filled: dict[str, tuple[Any, str]] | None = None) -> str:
    """The run's config as it ran: ``filled`` values put in, each marked (see :mod:`headstart.report.resolved`)."""
    text = run.config_text
    if not text and run.cfg is not None:
        import yaml

        from headstart.config import to_dict

        text = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
    if not text:
        return "<h3>Resolved config</h3><pre>config.yaml is missing</pre>"
    note = ('<p class="note">As the run used it: values the run resolved are filled in and marked '
            "<code># resolved</code>; automatic choices it does not record are marked so.</p>"
            if filled is not None else "")
    return f"<h3>Resolved config</h3>{note}<pre>{esc(annotate_config(text, filled or {}))}</pre>"


def _data_section(run: RunRecord, interp: Any) -> str:
    counts = run.summary.get("class_counts") or {}
    classes = run.summary.get("classes") or (interp.classes if interp is not None else [])
    src = run.summary.get("data") or (run.cfg.data.source if run.cfg else "?")
    if not counts:
        return section_html("data", kv_list([("source", src), ("classes", len(classes))]),
                        "No class counts: summary.json is missing (the run has not finished).")
    splits = list(counts)
    rows = [[c, *[counts[s].get(c, 0) for s in splits]] for c in classes]
    totals = [sum(counts[s].values()) for s in splits]
    rows.append([Cell(f'<td class="total">all {len(classes)} classes</td>'),
                 *[Cell(f'<td class="total">{t:,}</td>') for t in totals]])
    facts = [("source", src), ("classes", len(classes))]
    for s, t in zip(splits, totals):
        vals = list(counts[s].values()) or [0]
        facts.append((f"{s} images", f"{t:,} (per class {min(vals)} to {max(vals)})"))
    if run.cfg is not None:
        facts += _data_settings(run.cfg)
    return section_html("data", kv_list(facts) + html_table(["class", *splits], rows, "counts"))


def _data_settings(cfg: Any) -> list[tuple[str, str]]:
    """How the run drew its images, in words (on/off, "all"), not as Python values."""
    d = cfg.data

    def limit(n: int | None, what: str) -> str:
        return f"all {what} images" if n is None else f"at most {n:,} {what} images"

    augment = "off" if not d.augment else "on" if d.auto_augment == "none" else f"on, with {d.auto_augment}"
    return [
        ("validation split", f"{d.val_split:.0%} held out when the data has no split of its own (seed "
                             f"{cfg.train.seed})"),
        ("images used", f"{limit(d.limit_train, 'training')}, {limit(d.limit_val, 'validation')}"),
        ("augmentation", augment),
        ("class-balanced batches", "on" if d.balanced else "off"),
    ]


def _lr_find_section(run: RunRecord, out: Path) -> str:
    src = run.path / "lr_find.png"
    if not src.is_file():
        return ""
    png = src.read_bytes()
    return section_html("lr-find", figure_html(png, out / "lr_find.png", "learning-rate finder",
                                            "The learning-rate finder's loss against learning rate."))


# ---------------------------------------------------------------------- the page, in order


@register("summary", "Summary")
def summary(p: Page) -> str:
    return _summary_section(p.run, p.interp)


@register("curves", "Learning curves")
def curves(p: Page) -> str:
    return _curves_section(p.run, p.out)


@register("confusion", "Confusion matrix")
def confusion(p: Page) -> str:
    return _confusion_section(p.interp, p.problem, p.out)


@register("per-class", "Per-class scores")
def per_class(p: Page) -> str:
    return _per_class_section(p.interp, p.problem)


@register("mistakes", "Most confident mistakes")
def mistakes(p: Page) -> str:
    return _mistakes_section(p.interp, p.problem, p.out)


@register("unsure", "Least confident correct predictions")
def unsure(p: Page) -> str:
    return _unsure_section(p.interp, p.problem, p.out)


@register("trained", "What was trained")
def trained(p: Page) -> str:
    return _trained_section(p.run)


@register("data", "Data")
def data(p: Page) -> str:
    return _data_section(p.run, p.interp)


@register("lr-find", "Learning-rate finder")
def lr_find(p: Page) -> str:
    return _lr_find_section(p.run, p.out)
