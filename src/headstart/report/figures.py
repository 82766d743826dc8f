"""The report's figures as matplotlib Figures (Agg canvas, no pyplot), and PNG bytes of them.

TensorBoard uses ``confusion_heatmap_png`` without importing the rest of the report."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from headstart.evaluation.interpret import Interpretation, Prediction
    from headstart.report.run import StepRates
from headstart.report.markup import short

DPI = 110

EXAMPLES = 16  # thumbnails per grid

THUMB = 96  # thumbnail side in pixels

ANNOTATE_MAX = 20  # classes up to which confusion cells show their numbers

SIDE_BY_SIDE_MAX = 30  # classes up to which the two confusion matrices sit side by side


@contextmanager
def quiet() -> Iterator[None]:
    # Layout and missing-glyph warnings are cosmetic; a report must not fail over them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def new_figure(width: float, height: float, **kw: Any) -> Figure:
    """A figure drawn by Agg, with no pyplot state: safe headless, in threads and in notebooks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, exactly as the report writes and embeds it."""
    buf = io.BytesIO()
    with quiet():
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None},
                    bbox_inches="tight", pad_inches=0.12)
    return buf.getvalue()


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
        ax.text((a + b) / 2, 1.02, short(name, 18), transform=tf, va="bottom",
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


def learning_curves_figure(history: Sequence[dict[str, Any]], steps: StepRates | None = None) -> Figure:
    """Loss and accuracy per epoch (top) and each depth group's learning rate (bottom), stages marked.

    With ``steps`` (the run's TensorBoard scalars) the rates are drawn at every optimizer step,
    warm-up and decay within epochs included; without, at the start of each epoch only.
    """
    fig = new_figure(11, 7.6)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    ax_loss, ax_acc, ax_lr = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    xs = [r["global_epoch"] for r in history]
    spans = _stage_spans(history)
    mk = {"marker": "o", "markersize": 4} if len(xs) <= 40 else {}
    _plot_loss(ax_loss, history, xs, mk)
    _plot_accuracy(ax_acc, history, xs, mk)
    if steps is not None:
        _plot_step_lrs(ax_lr, history, steps, spans)
    else:
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
            ax.plot(xs[a:b], ys[a:b], label=short(g, 20) if k == 0 else None, **style)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate at epoch start")
    _lr_legend(ax, groups)


def _plot_step_lrs(ax: Any, history: Sequence[dict[str, Any]], steps: StepRates,
                   spans: list[tuple[str, float, float]]) -> None:
    """One line per group through every optimizer step's rate, broken where a stage begins."""
    from matplotlib import colormaps

    known = _lr_groups(history)
    extra = [g for g in steps.lrs if g not in known]  # groups no epoch row names (a run cut short)
    groups = [g for g in known if g in steps.lrs] + extra
    groups = [g for g in groups if g != "head"] + (["head"] if "head" in groups else [])
    body = [g for g in groups if g != "head"]
    starts = [a - 0.5 for _, a, _ in spans[1:]]  # stage boundaries on the epoch axis
    positive = False
    for g in groups:
        pts = [(steps.epoch_position(s), v) for s, v in steps.lrs[g]]
        positive |= any(v > 0 for _, v in pts)
        depth = body.index(g) / max(1, len(body) - 1) if g in body else 1.0
        style = _lr_style(g, depth, colormaps["viridis"], len(pts) <= 40)
        for k, seg in enumerate(_split_at(pts, starts)):
            xs, ys = zip(*seg)
            ax.plot(xs, [y if y > 0 else float("nan") for y in ys], label=short(g, 20) if k == 0 else None,
                    **style)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate per optimizer step")
    _lr_legend(ax, groups)


def _lr_legend(ax: Any, groups: Sequence[str]) -> None:
    if groups:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7 if len(groups) > 8 else 8,
                  ncol=1 if len(groups) <= 14 else 2, title="depth group", title_fontsize=8)


def _split_at(pts: list[tuple[float, float]], cuts: Sequence[float]) -> list[list[tuple[float, float]]]:
    """``pts`` (in x order) in runs that no cut falls inside: each stage builds a new optimizer."""
    runs: list[list[tuple[float, float]]] = []
    for p in pts:
        if not runs or any(runs[-1][-1][0] < c <= p[0] for c in cuts):
            runs.append([])
        runs[-1].append(p)
    return runs


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
    longest = max((len(short(c, width)) for c in interp.classes), default=1)
    labels_in = 0.56 * font / 72 * longest + 0.4  # room the tick labels take
    cells_in = max(2.6, n * (0.5 if n <= 10 else 0.3 if n <= 30 else 0.13))
    panel_w, panel_h = cells_in + labels_in + 1.5, cells_in + labels_in + 0.9
    if n <= SIDE_BY_SIDE_MAX:
        fig = new_figure(2 * panel_w, panel_h)
        axes = fig.subplots(1, 2)
    else:
        fig = new_figure(panel_w, 2 * panel_h)
        axes = fig.subplots(2, 1)
    heatmap(fig, axes[0], interp.confusion(normalised=True).numpy() * 100, interp.classes,
             "row-normalised (% of true class)", percent=True)
    heatmap(fig, axes[1], interp.confusion().numpy(), interp.classes, "counts", percent=False)
    return fig


def _label_style(n: int) -> tuple[float, int]:
    """Tick font size and the length class names are cut to, for ``n`` classes."""
    if n <= 10:
        return 9, 24
    if n <= 30:
        return 7, 20
    return (5, 16) if n <= 60 else (4, 14)


def heatmap(fig: Figure, ax: Any, mat: Any, classes: Sequence[str], title: str, percent: bool) -> None:
    n = len(classes)
    top = 100.0 if percent else max(1.0, float(mat.max()))
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
    font, width = _label_style(n)
    labels = [short(c, width) for c in classes]
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
    fig = new_figure(max(3.0, cols * 1.3), rows * 1.75 + (0.35 if title else 0))
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
    title = f"#{number}  {p.confidence:.1%}\ntrue: {short(p.true, 14)}\npred: {short(p.predicted, 14)}"
    ax.set_title(title,
                 fontsize=7.5, color=colour if not p.correct else "black", linespacing=1.15)


def confusion_heatmap_png(report: Any) -> bytes:
    """The row-normalised confusion matrix of a :class:`~headstart.evaluation.metrics.ClassReport` as PNG bytes
    (for TensorBoard, where the full report's interpretation is not at hand)."""
    cm = report.confusion.double()
    norm = (cm / cm.sum(1, keepdim=True).clamp(min=1)).numpy() * 100
    n = len(report.classes)
    side = max(3.5, n * (0.5 if n <= 10 else 0.3 if n <= 30 else 0.13)) + 1.5
    fig = new_figure(side + 1.2, side)
    heatmap(fig, fig.subplots(), norm, report.classes, "validation confusion (% of true class)", percent=True)
    return figure_png(fig)
