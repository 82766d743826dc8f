"""A run's report: one self-contained HTML page that says what was trained and how it went.

:func:`write_report` writes ``RUN_DIR/report/report.html`` and each of its figures as a PNG file
beside it. The page embeds the figures as ``data:`` URIs and its CSS inline, and refers to no
other file and no URL, so it can be mailed, archived or opened offline in any browser; it needs
no JavaScript. Sections:

* summary: model, data, accuracies, wall time;
* learning curves: train/validation loss and accuracy per epoch with the stages marked, and the
  learning rate of every depth group (log scale) below;
* confusion matrix: row-normalised and raw counts;
* per-class precision, recall, F1 and support, worst F1 first;
* the most confident mistakes and the least confident correct predictions, as thumbnails;
* what was trained: model, weights, which depth groups each stage froze, parameter counts,
  time and throughput per stage, the resolved config;
* the data: images per class in each split;
* the learning-rate finder's plot when the run folder has ``lr_find.png``.

The predictions come from :func:`headstart.evaluation.interpret.interpret` (the run's best checkpoint on
its own validation images) unless an :class:`~headstart.evaluation.interpret.Interpretation` is passed in.
The figure functions (``learning_curves_figure``, ``confusion_figure``, ``examples_figure``)
return matplotlib figures, which notebooks display as they are.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.errors import HeadstartError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from headstart.evaluation.interpret import Interpretation, Prediction

REPORT_DIR = "report"
REPORT_FILE = "report.html"
#: Section headings, in page order (the learning-rate finder's only when its plot exists).
SECTIONS = {
    "summary": "Summary",
    "curves": "Learning curves",
    "confusion": "Confusion matrix",
    "per-class": "Per-class scores",
    "mistakes": "Most confident mistakes",
    "unsure": "Least confident correct predictions",
    "trained": "What was trained",
    "data": "Data",
    "lr-find": "Learning-rate finder",
}
#: Figure files the report writes (and removes before writing, so none is stale).
FIGURES = ("learning_curves.png", "confusion_matrix.png", "mistakes.png", "least_confident_correct.png",
           "lr_find.png")
DPI = 110
EXAMPLES = 16  # thumbnails per grid
THUMB = 96  # thumbnail side in pixels
ANNOTATE_MAX = 20  # classes up to which confusion cells show their numbers
SIDE_BY_SIDE_MAX = 30  # classes up to which the two confusion matrices sit side by side
SCROLL_ROWS = 25  # tables longer than this scroll inside the page


@dataclass
class RunRecord:
    """What a run folder holds, read once."""

    path: Path
    cfg: Any = None  # RunConfig, None when config.yaml is missing or unreadable
    config_text: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def write_report(run_dir: str | Path, *, data_source: str | None = None,
                 interp: Interpretation | None = None) -> Path:
    """Write ``run_dir/report/report.html`` (and the figures as PNGs beside it); returns the page's path.

    ``data_source`` interprets the model on other data than the run's own validation split;
    ``interp`` reuses predictions already computed. When predictions cannot be made (no
    checkpoint yet, data not available) the page says why and shows the rest.
    """
    run = read_run(run_dir)
    out = run.path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)
    problem = ""
    if interp is None:
        interp, problem = _try_interpret(run, data_source)
    body = "\n".join(s for s in (
        _summary_section(run, interp),
        _curves_section(run, out),
        _confusion_section(interp, problem, out),
        _per_class_section(interp, problem),
        _mistakes_section(interp, problem, out),
        _unsure_section(interp, problem, out),
        _trained_section(run),
        _data_section(run, interp),
        _lr_find_section(run, out),
    ) if s)
    page = _page(f"headstart report: {run.path.name}", body)
    path = out / REPORT_FILE
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def read_run(run_dir: str | Path) -> RunRecord:
    """Config, summary, per-epoch history and best checkpoint of a run folder."""
    from headstart.config import load_yaml

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise HeadstartError(f"run folder {path} does not exist")
    run = RunRecord(path)
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            run.cfg = load_yaml(cfg_path)
        except HeadstartError:
            run.cfg = None
    if (path / "summary.json").is_file():
        try:
            run.summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            run.summary = {}
    from headstart.training.runs import RunDir

    run.history = RunDir(path).history() if (path / "metrics.jsonl").is_file() else []
    run.checkpoint = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
    return run


def _try_interpret(run: RunRecord, data_source: str | None) -> tuple[Any, str]:
    if run.checkpoint is None:
        return None, "the run folder has no checkpoint (best.pt or last.pt) yet"
    from headstart.evaluation.interpret import interpret

    try:
        return interpret(run.checkpoint, data_source=data_source), ""
    except HeadstartError as e:
        return None, str(e)


# ---------------------------------------------------------------------- figures


@contextmanager
def _quiet() -> Iterator[None]:
    # Layout and missing-glyph warnings are cosmetic; a report must not fail over them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _new_figure(width: float, height: float, **kw: Any) -> Figure:
    """A figure drawn by Agg, with no pyplot state: safe headless, in threads and in notebooks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, exactly as the report writes and embeds it."""
    buf = io.BytesIO()
    with _quiet():
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None},
                    bbox_inches="tight", pad_inches=0.12)
    return buf.getvalue()


def _figure_html(png: bytes, path: Path, alt: str, caption: str = "") -> str:
    """Write the PNG file and return the page's ``<figure>`` embedding the same bytes."""
    path.write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>'


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _stage_spans(history: Sequence[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(stage name, first global epoch, last global epoch) of each run of consecutive rows."""
    spans: list[tuple[str, float, float]] = []
    key = None
    for r in history:
        k = _stage_key(r)
        if k != key:
            spans.append((str(r.get("stage", "?")), r["global_epoch"], r["global_epoch"]))
            key = k
        else:
            name, a, _ = spans[-1]
            spans[-1] = (name, a, r["global_epoch"])
    return spans


def _mark_stages(ax: Any, spans: list[tuple[str, float, float]], label: bool) -> None:
    from matplotlib.transforms import blended_transform_factory

    for i, (_, a, _) in enumerate(spans):
        if i > 0:
            ax.axvline(a - 0.5, color="0.35", linestyle="--", linewidth=1)
        if i % 2 == 1:
            ax.axvspan(a - 0.5, spans[i][2] + 0.5, color="0.5", alpha=0.07, linewidth=0)
    if not label:
        return
    many = len(spans) > 4
    tf = blended_transform_factory(ax.transData, ax.transAxes)
    for name, a, b in spans:
        ax.text((a + b) / 2, 1.02, _short(name, 18), transform=tf, va="bottom",
                ha="left" if many else "center",
                fontsize=7 if many else 9, rotation=60 if many else 0, color="0.2",
                rotation_mode="anchor" if many else "default")


def _epoch_axis(ax: Any, xs: Sequence[float]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    if len(set(xs)) <= 12:
        ax.set_xticks(sorted(set(xs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def learning_curves_figure(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch (top) and each depth group's learning rate (bottom), stages marked."""
    fig = _new_figure(11, 7.6)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    ax_loss, ax_acc, ax_lr = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    xs = [r["global_epoch"] for r in history]
    spans = _stage_spans(history)
    mk = {"marker": "o", "markersize": 4} if len(xs) <= 40 else {}
    _plot_loss(ax_loss, history, xs, mk)
    _plot_accuracy(ax_acc, history, xs, mk)
    _plot_lrs(ax_lr, history, xs, mk)
    for ax in (ax_loss, ax_acc, ax_lr):
        _mark_stages(ax, spans, label=True)
        _epoch_axis(ax, xs)
    return fig


def _column(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in history]


def _plot_loss(ax: Any, history: Sequence[dict[str, Any]], xs: list[float], mk: dict[str, Any]) -> None:
    ax.plot(xs, _column(history, "train_loss"), label="train", color="tab:blue", **mk)
    ax.plot(xs, _column(history, "val_loss"), label="validation", color="tab:orange", **mk)
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=8)


def _plot_accuracy(ax: Any, history: Sequence[dict[str, Any]], xs: list[float], mk: dict[str, Any]) -> None:
    from matplotlib.ticker import PercentFormatter

    val = _column(history, "val_acc")
    ax.plot(xs, _column(history, "train_acc"), label="train", color="tab:blue", **mk)
    ax.plot(xs, val, label="validation", color="tab:orange", **mk)
    if any(r.get("val_top5") is not None for r in history):
        ax.plot(xs, _column(history, "val_top5"), label="validation top-5", color="tab:orange",
                linestyle=":", **mk)
    finite = [(v, x) for v, x in zip(val, xs) if not math.isnan(v)]
    if finite:
        best, bx = max(finite, key=lambda t: (t[0], -t[1]))
        ax.plot([bx], [best], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"best {best:.1%} (epoch {bx})")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.legend(loc="best", fontsize=8)


def _lr_groups(history: Sequence[dict[str, Any]]) -> list[str]:
    """Group names in depth order (the widest row's order, which follows the network), head last."""
    names: list[str] = []
    for r in sorted(history, key=lambda r: -len(r.get("lrs") or {})):
        names += [g for g in (r.get("lrs") or {}) if g not in names]
    return [g for g in names if g != "head"] + (["head"] if "head" in names else [])


def _plot_lrs(ax: Any, history: Sequence[dict[str, Any]], xs: list[float], mk: dict[str, Any]) -> None:
    """One line per group, broken at stage boundaries (each stage builds a new optimizer).

    Groups often share a rate (no layer decay); larger, fainter markers for shallower groups keep
    every group visible where the lines coincide, the head drawn last in black.
    """
    from matplotlib import colormaps

    groups = _lr_groups(history)
    body = [g for g in groups if g != "head"]
    cmap = colormaps["viridis"]
    breaks = [i for i in range(1, len(history)) if _stage_key(history[i]) != _stage_key(history[i - 1])]
    cuts = list(zip([0, *breaks], [*breaks, len(history)]))
    positive = False
    for g in groups:
        ys = [(r.get("lrs") or {}).get(g) for r in history]
        ys = [y if isinstance(y, (int, float)) and y > 0 else float("nan") for y in ys]
        positive |= any(not math.isnan(y) for y in ys)
        depth = body.index(g) / max(1, len(body) - 1) if g in body else 1.0
        style = _lr_style(g, depth, cmap, bool(mk))
        for k, (a, b) in enumerate(cuts):
            ax.plot(xs[a:b], ys[a:b], label=_short(g, 20) if k == 0 else None, **style)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate at epoch start")
    if groups:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7 if len(groups) > 8 else 8,
                  ncol=1 if len(groups) <= 14 else 2, title="depth group", title_fontsize=8)


def _stage_key(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("stage_index"), row.get("stage")


def _lr_style(group: str, depth: float, cmap: Any, markers: bool) -> dict[str, Any]:
    if group == "head":
        style: dict[str, Any] = {"color": "black", "linewidth": 1.6, "zorder": 5}
        size = 4.0
    else:
        style = {"color": cmap(0.9 * depth), "linewidth": 1.3 + 2.5 * (1 - depth), "alpha": 0.85}
        size = 5.0 + 7.0 * (1 - depth)
    if markers:
        style |= {"marker": "o", "markersize": size}
    return style


def confusion_figure(interp: Interpretation) -> Figure:
    """Row-normalised (% of each true class) and raw-count confusion matrices with class names.

    Side by side up to ``SIDE_BY_SIDE_MAX`` classes, one above the other beyond; the figure grows
    with the number of classes and the length of their (shortened) names.
    """
    n = len(interp.classes)
    font, width = _label_style(n)
    longest = max((len(_short(c, width)) for c in interp.classes), default=1)
    labels_in = 0.56 * font / 72 * longest + 0.4  # room the tick labels take
    cells_in = max(2.6, n * (0.5 if n <= 10 else 0.3 if n <= 30 else 0.13))
    panel_w, panel_h = cells_in + labels_in + 1.5, cells_in + labels_in + 0.9
    if n <= SIDE_BY_SIDE_MAX:
        fig = _new_figure(2 * panel_w, panel_h)
        axes = fig.subplots(1, 2)
    else:
        fig = _new_figure(panel_w, 2 * panel_h)
        axes = fig.subplots(2, 1)
    _heatmap(fig, axes[0], interp.confusion(normalised=True).numpy() * 100, interp.classes,
             "row-normalised (% of true class)", percent=True)
    _heatmap(fig, axes[1], interp.confusion().numpy(), interp.classes, "counts", percent=False)
    return fig


def _label_style(n: int) -> tuple[float, int]:
    """Tick font size and the length class names are cut to, for ``n`` classes."""
    if n <= 10:
        return 9, 24
    if n <= 30:
        return 7, 20
    return (5, 16) if n <= 60 else (4, 14)


def _heatmap(fig: Figure, ax: Any, mat: Any, classes: Sequence[str], title: str, percent: bool) -> None:
    n = len(classes)
    top = 100.0 if percent else max(1.0, float(mat.max()))
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
    font, width = _label_style(n)
    labels = [_short(c, width) for c in classes]
    upright = max((len(c) for c in labels), default=0) <= 3
    ax.set_xticks(range(n), labels, rotation=0 if upright else 90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                if v:
                    text = f"{v:.0f}" if percent else f"{int(v)}"
                    colour = "white" if v > top * 0.55 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=max(5, font - 1), color=colour,
                            weight="bold" if i == j else "normal")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.ax.tick_params(labelsize=7)
    if not percent:
        from matplotlib.ticker import MaxNLocator

        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    if percent:
        cb.set_label("% of true class", fontsize=8)


def thumbnail(img: Any, size: int = THUMB) -> Any:
    """``img`` scaled so its longer side is ``size`` (nearest-neighbour when enlarging tiny images)."""
    from PIL import Image

    w, h = img.size
    scale = size / max(1, w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.convert("RGB").resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def examples_figure(interp: Interpretation, preds: Sequence[Prediction], title: str = "") -> Figure:
    """A grid of thumbnails titled with true class, prediction and confidence (red when wrong)."""
    cols = max(1, min(8, len(preds)))
    rows = max(1, math.ceil(len(preds) / cols))
    fig = _new_figure(max(3.0, cols * 1.3), rows * 1.75 + (0.35 if title else 0))
    if title:
        fig.suptitle(title, fontsize=11)
    for k, p in enumerate(preds):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw_example(ax, interp, p, k + 1)
    return fig


def _draw_example(ax: Any, interp: Interpretation, p: Prediction, number: int) -> None:
    try:
        ax.imshow(thumbnail(interp.image(p.index)), interpolation="nearest")
    except Exception:  # noqa: BLE001 - a moved or unreadable file: show the text alone
        ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=8, color="0.4",
                transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    colour = "tab:green" if p.correct else "tab:red"
    for s in ax.spines.values():
        s.set_color(colour)
        s.set_linewidth(2)
    title = f"#{number}  {p.confidence:.1%}\ntrue: {_short(p.true, 14)}\npred: {_short(p.predicted, 14)}"
    ax.set_title(title,
                 fontsize=7.5, color=colour if not p.correct else "black", linespacing=1.15)


# ---------------------------------------------------------------------- sections


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _section(key: str, inner: str, note: str = "") -> str:
    return (f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>'
            + (f'<p class="note">{note}</p>' if note else "") + inner + "</section>")


def _unavailable(key: str, problem: str) -> str:
    return _section(key, "", f"Not available: {_e(problem or 'no predictions were made')}.")


class _Cell(str):
    """A table cell already written as HTML (``<td ...>...</td>``); other cells are escaped text."""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if isinstance(c, _Cell) else f"<td>{_e(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>' if len(rows) > SCROLL_ROWS else table


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs) + "</dl>"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{float(v):.2%}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _share(part: int, total: int) -> str:
    f = part / max(1, total)
    return f"{f:.0%}" if f >= 0.1 or f == 0 else f"{f:.2%}" if f >= 0.0001 else "<0.01%"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 1:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _summary_section(run: RunRecord, interp: Any) -> str:
    s, cfg = run.summary, run.cfg
    model = s.get("model") or (cfg.model.name if cfg else "?")
    weights = s.get("weights") or (cfg.model.weights if cfg else "?")
    pairs = [
        ("run folder", run.path.name),
        ("model", f"{model} (weights {weights})"),
        ("data", s.get("data") or (cfg.data.source if cfg else "?")),
        ("classes", len(s.get("classes") or (interp.classes if interp else []))),
        ("epochs", s.get("epochs", len(run.history))),
        ("best validation accuracy", _pct(s.get("best_val_accuracy"))),
        ("final validation accuracy", _pct(s.get("final_val_accuracy"))),
        ("final validation top-5", _pct(s.get("final_val_top5"))),
        ("wall time", _duration(s.get("wall_seconds"))),
    ]
    if interp is not None:
        r = interp.report
        scores = f"top-1 {r.top1:.2%}, top-5 {r.top5:.2%}, loss {r.loss:.4f}"
        what = f"{len(interp)} {interp.split} images of {interp.source}"
        pairs.append(("this report's predictions", f"{what}: {scores}"))
    if not run.summary:
        pairs.append(("status", "no summary.json: the run has not finished"))
    pairs.append(("report written", time.strftime("%Y-%m-%d %H:%M:%S")))
    return _section("summary", _kv(pairs))


def _curves_section(run: RunRecord, out: Path) -> str:
    history = [r for r in run.history if "global_epoch" in r]
    if not history:
        return _section("curves", "", "No epochs were logged (metrics.jsonl is missing or empty).")
    with _quiet():
        png = figure_png(learning_curves_figure(history))
    cap = ("Loss and accuracy per epoch; dashed lines separate the stages (named above each plot); the star "
           "is the best validation accuracy. Below: each depth group's learning rate at the start of each "
           "epoch (warm-up and decay happen within epochs).")
    return _section("curves", _figure_html(png, out / "learning_curves.png", "learning curves", cap))


def _confusion_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return _unavailable("confusion", problem)
    with _quiet():
        png = figure_png(confusion_figure(interp))
    pairs = interp.most_confused(8)
    confused = ("Most confused: " + "; ".join(f"{_e(t)} → {_e(p)} ({n})" for t, p, n in pairs) + "."
                ) if pairs else "No confusions: every image was classified correctly."
    cap = f"Rows: true class; columns: predicted class. {confused}"
    return _section("confusion", _figure_html(png, out / "confusion_matrix.png", "confusion matrix", cap))


def _per_class_section(interp: Any, problem: str) -> str:
    if interp is None:
        return _unavailable("per-class", problem)
    cm = interp.confusion()
    rows = []
    for s in interp.per_class():
        off = cm[s.index].clone()
        off[s.index] = 0
        j = int(off.argmax())
        confused = f"{interp.classes[j]} ({int(off[j])})" if int(off[j]) > 0 else "–"
        bar = _Cell(f'<td class="num"><span class="bar" style="width:{s.f1 * 100:.0f}%"></span>'
                    f'<span class="val">{s.f1:.3f}</span></td>')
        rows.append([s.name, f"{s.precision:.3f}", f"{s.recall:.3f}", bar, s.support, confused])
    r = interp.report
    note = (f"Top-1 {r.top1:.2%}, top-5 {r.top5:.2%} on {sum(r.support)} images; "
            "worst F1 first; classes with no images here (support 0) come last.")
    header = ["class", "precision", "recall", "F1", "support", "most often mistaken for"]
    table = _table(header, rows, "scores")
    return _section("per-class", table, note)


def _examples_table(interp: Any, preds: Sequence[Any]) -> str:
    root = str(interp.source).rstrip("/") + "/"

    def name(p: Any) -> str:
        return p.description.removeprefix(root)

    if preds and preds[0].correct:
        rows = [[k + 1, name(p), p.true, f"{p.confidence:.1%}", p.runner_up or "–",
                 f"{p.runner_up_probability:.1%}"] for k, p in enumerate(preds)]
        header = ["#", "image", "class", "confidence", "runner-up", "runner-up probability"]
        return _table(header, rows, "examples")
    rows = [[k + 1, name(p), p.true, p.predicted, f"{p.confidence:.1%}", f"{p.true_probability:.1%}"]
            for k, p in enumerate(preds)]
    return _table(["#", "image", "true", "predicted", "confidence", "P(true class)"], rows, "examples")


def _examples_section(key: str, interp: Any, problem: str, out: Path, preds: Sequence[Any], file: str,
                      note: str) -> str:
    if interp is None:
        return _unavailable(key, problem)
    if not preds:
        return _section(key, "", _e(note))
    with _quiet():
        png = figure_png(examples_figure(interp, preds))
    fig = _figure_html(png, out / file, SECTIONS[key].lower())
    return _section(key, fig + _examples_table(interp, preds), _e(note))


def _mistakes_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return _unavailable("mistakes", problem)
    preds = interp.top_mistakes(EXAMPLES)
    wrong = int((interp.preds != interp.targets).sum())
    note = (f"{_count(wrong, 'wrong prediction')} in all; the {len(preds)} made with the highest confidence, "
            "most confident first. They are often mislabelled or truly ambiguous images."
            if wrong else f"No mistakes on the {len(interp)} images.")
    return _examples_section("mistakes", interp, problem, out, preds, "mistakes.png", note)


def _unsure_section(interp: Any, problem: str, out: Path) -> str:
    if interp is None:
        return _unavailable("unsure", problem)
    preds = interp.least_confident_correct(EXAMPLES)
    right = int((interp.preds == interp.targets).sum())
    note = (f"{_count(right, 'right prediction')} in all; the {len(preds)} made with the lowest confidence, "
            "least confident first: the images the model is closest to getting wrong."
            if right else "No image was classified correctly.")
    return _examples_section("unsure", interp, problem, out, preds, "least_confident_correct.png", note)


# --- what was trained


@dataclass
class StagePlan:
    """One stage as the config resolves it on the trained network."""

    name: str
    epochs: int
    lr: float | str
    layer_decay: float
    bn: str
    freeze: str
    states: dict[str, str]  # depth group (and head) -> trainable / frozen / partial
    trainable: int


def stage_plans(cfg: Any, net: Any) -> list[StagePlan]:
    """Freeze state and trainable parameters of each stage of ``cfg.train`` on ``net``."""
    from headstart.models.freeze import count_params, trainable_state
    from headstart.training.optim import apply_stage, resolve_stages

    plans = []
    for st in resolve_stages(cfg.train, net):
        apply_stage(net, st)
        lr = st.lr if st.lr is not None else cfg.train.lr
        plans.append(StagePlan(st.name, st.epochs, lr, st.layer_decay, st.bn, st.freeze,
                               trainable_state(net), count_params(net)[1]))
    return plans


def _trained_section(run: RunRecord) -> str:
    if run.checkpoint is None:
        return _section("trained", _config_block(run), "No checkpoint yet: the model cannot be described.")
    from headstart.config import RunConfig, from_dict
    from headstart.models import checkpoint
    from headstart.models.freeze import count_params

    try:
        net, ckpt = checkpoint.load_network(run.checkpoint)
        cfg = run.cfg or from_dict(RunConfig, ckpt.get("config") or {})
        plans = stage_plans(cfg, net)
    except HeadstartError as e:
        return _section("trained", _config_block(run), f"The model cannot be described: {_e(e)}")
    group_sizes = {g: sum(p.numel() for _, p in ps) for g, ps in net.group_params()}
    total = count_params(net)[0]
    pre = net.preprocessing
    head, tc = group_sizes.get("head", 0), cfg.train
    schedule = (f"{len(plans)} stage(s), optimizer {tc.optimizer}, scheduler {tc.scheduler}, warm-up "
                f"{tc.warmup:.0%} of each stage, weight decay {tc.weight_decay}")
    facts = _kv([
        ("model", f"{net.name} ({net.source})"),
        ("weights", cfg.model.weights),
        ("input", f"{pre.crop}×{pre.crop} px (resize {pre.resize}, {pre.interpolation})"),
        ("classifier", f"{net.head_config.kind} head, {net.num_classes} classes, {head:,} parameters"),
        ("parameters", f"{total:,} in all, {total - head:,} in the body's {len(net.groups)} depth groups"),
        ("schedule", schedule),
        ("wall time", f"{_duration(run.summary.get('wall_seconds'))} (whole job)"),
    ])
    inner = facts + _stages_table(run, plans, total) + _freeze_map(plans, group_sizes) + _config_block(run)
    return _section("trained", inner)


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
        rows.append([p.name, f"{ran.get(p.name, 0)} of {p.epochs}", lr, f"{p.layer_decay:g}",
                     p.freeze, p.bn, f"{p.trainable:,} ({_share(p.trainable, total)})",
                     _duration(d.get("seconds")) if d else "–",
                     f"{d['images_per_s']:,.0f}" if d.get("images_per_s") else "–"])
    header = ["stage", "epochs run", "base lr", "layer decay", "freeze", "BatchNorm", "trainable parameters",
              "training time", "images/s"]
    return ("<h3>Stages</h3>" + _table(header, rows, "stages")
            + '<p class="note">Training time sums the epochs\' training passes and the feature caching of '
              "a frozen body (validation not included); images/s is the last epoch's training throughput.</p>")


def _freeze_map(plans: Sequence[StagePlan], group_sizes: dict[str, int]) -> str:
    if not plans:
        return ""
    groups = list(plans[0].states)
    rows = []
    for g in groups:
        states = [p.states.get(g, "-") for p in plans]
        cells = [_Cell(f'<td class="st-{_e(st)}">{_e(st)}</td>') for st in states]
        rows.append([g, f"{group_sizes.get(g, 0):,}", *cells])
    return ("<h3>Depth groups trained in each stage</h3>"
            + _table(["depth group", "parameters", *[p.name for p in plans]], rows, "freeze"))


def _config_block(run: RunRecord) -> str:
    text = run.config_text
    if not text and run.cfg is not None:
        import yaml

        from headstart.config import to_dict

        text = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
    return f"<h3>Resolved config</h3><pre>{_e(text or 'config.yaml is missing')}</pre>"


# --- data


def _data_section(run: RunRecord, interp: Any) -> str:
    counts = run.summary.get("class_counts") or {}
    classes = run.summary.get("classes") or (interp.classes if interp is not None else [])
    src = run.summary.get("data") or (run.cfg.data.source if run.cfg else "?")
    if not counts:
        return _section("data", _kv([("source", src), ("classes", len(classes))]),
                        "No class counts: summary.json is missing (the run has not finished).")
    splits = list(counts)
    rows = [[c, *[counts[s].get(c, 0) for s in splits]] for c in classes]
    totals = [sum(counts[s].values()) for s in splits]
    rows.append([_Cell(f'<td class="total">all {len(classes)} classes</td>'),
                 *[_Cell(f'<td class="total">{t:,}</td>') for t in totals]])
    facts = [("source", src), ("classes", len(classes))]
    for s, t in zip(splits, totals):
        vals = list(counts[s].values()) or [0]
        facts.append((f"{s} images", f"{t:,} (per class {min(vals)} to {max(vals)})"))
    if run.cfg is not None:
        d = run.cfg.data
        facts.append(("split and limits", (f"val_split {d.val_split}, seed {run.cfg.train.seed}, limit_train "
                                          f"{d.limit_train}, limit_val {d.limit_val}, augment {d.augment}")))
    return _section("data", _kv(facts) + _table(["class", *splits], rows, "counts"))


def _lr_find_section(run: RunRecord, out: Path) -> str:
    src = run.path / "lr_find.png"
    if not src.is_file():
        return ""
    png = src.read_bytes()
    return _section("lr-find", _figure_html(png, out / "lr_find.png", "learning-rate finder",
                                            "The learning-rate finder's loss against learning rate."))


# ---------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d232a;
background:#f4f5f7;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:0 0 10px;border-bottom:2px solid #dde1e6;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
section{background:#fff;border-radius:8px;padding:16px 20px;margin:16px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
nav{font-size:13px}nav a{margin-right:14px;color:#2a5db0;text-decoration:none}
figure{margin:8px 0}figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption,.note{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{padding:3px 10px;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
th{background:#eef1f4;position:sticky;top:0}tbody tr:nth-child(even){background:#fafbfc}
td.num{position:relative;min-width:90px}
.bar{position:absolute;left:0;top:3px;bottom:3px;background:#cfe0f5}.val{position:relative}
.scroll{max-height:560px;overflow:auto;border:1px solid #e4e7eb;display:inline-block}
td.st-frozen{background:#dfe3e8;color:#444}td.st-trainable{background:#cdeccf;color:#14521a;font-weight:600}
td.st-partial{background:#fbe6b8}td.total{font-weight:600;border-top:2px solid #c9ced4}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0;font-size:14px}
dl.kv dt{color:#555}dl.kv dd{margin:0;overflow-wrap:anywhere}
pre{background:#f6f8fa;border:1px solid #e4e7eb;padding:10px;font-size:12px;overflow:auto}
"""


def _page(title: str, body: str) -> str:
    nav = " ".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items() if f'id="{k}"' in body)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>"
        f"<h1>{_e(title)}</h1><nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )


__all__ = [
    "FIGURES",
    "SECTIONS",
    "confusion_figure",
    "examples_figure",
    "figure_png",
    "learning_curves_figure",
    "read_run",
    "stage_plans",
    "thumbnail",
    "write_report",
]


def confusion_heatmap_png(report: Any) -> bytes:
    """The row-normalised confusion matrix of a :class:`~headstart.evaluation.metrics.ClassReport` as PNG bytes
    (for TensorBoard, where the full report's interpretation is not at hand)."""
    cm = report.confusion.double()
    norm = (cm / cm.sum(1, keepdim=True).clamp(min=1)).numpy() * 100
    n = len(report.classes)
    side = max(3.5, n * (0.5 if n <= 10 else 0.3 if n <= 30 else 0.13)) + 1.5
    fig = _new_figure(side + 1.2, side)
    _heatmap(fig, fig.subplots(), norm, report.classes, "validation confusion (% of true class)", percent=True)
    return figure_png(fig)
