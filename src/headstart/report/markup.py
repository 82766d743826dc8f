"""Small HTML helpers for the report: escaping, tables, key-value lists, numbers as text, the CSS."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover

    pass


SCROLL_ROWS = 25  # tables longer than this scroll inside the page


def figure_html(png: bytes, path: Path, alt: str, caption: str = "") -> str:
    """Write the PNG file and return the page's ``<figure>`` embedding the same bytes."""
    path.write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


class Cell(str):
    """A table cell already written as HTML (``<td ...>...</td>``); other cells are escaped text."""


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if isinstance(c, Cell) else f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>' if len(rows) > SCROLL_ROWS else table


def kv_list(pairs: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def pct(v: Any) -> str:
    return "–" if v is None else f"{float(v):.2%}"


def count_text(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def share(part: int, total: int) -> str:
    f = part / max(1, total)
    return f"{f:.0%}" if f >= 0.1 or f == 0 else f"{f:.2%}" if f >= 0.0001 else "<0.01%"


def duration(seconds: Any) -> str:
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
