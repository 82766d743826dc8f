"""Writing the report page: every registered section in order, then the figures beside the page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover

    from headstart.evaluation.interpret import Interpretation
from headstart.report.markup import CSS, esc
from headstart.report.run import read_run, try_interpret
from headstart.report.sections import SECTIONS, Page, render_sections

REPORT_DIR = "report"
REPORT_FILE = "report.html"

#: Figure files the report writes (and removes before writing, so none is stale).
FIGURES = ("learning_curves.png", "confusion_matrix.png", "mistakes.png", "least_confident_correct.png",
           "lr_find.png")


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
        interp, problem = try_interpret(run, data_source)
    body = render_sections(Page(run, interp, problem, out))
    page = page_html(f"headstart report: {run.path.name}", body)
    path = out / REPORT_FILE
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def page_html(title: str, body: str) -> str:
    """The whole page: title, a navigation bar over the sections present, the sections, inline CSS."""
    nav = " ".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in SECTIONS.items() if f'id="{k}"' in body)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>"
        f"<h1>{esc(title)}</h1><nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )


__all__ = ["FIGURES", "REPORT_DIR", "REPORT_FILE", "page_html", "write_report"]
