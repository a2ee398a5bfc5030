"""The report page: one self-contained HTML file per experiment.

Everything the page shows travels inside it: figures and crops as base64
PNG data URIs, the table behind each figure as a ``data:text/csv`` download
link (and the same CSV written beside the page, under ``data/``). Only the
full-size overlays are separate files (linked; their thumbnails are
embedded). Every value from the CSV is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#123;color:#fff;padding:18px 28px}header h1{margin:0 0 6px;font-size:24px}
header p{margin:2px 0;color:#cde}nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 28px;z-index:2}
nav a{margin-right:16px;color:#246;text-decoration:none;font-size:14px}main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:14px 18px;margin:16px 0}
h2{margin:0 0 8px;font-size:19px}h3{font-size:15px;margin:14px 0 6px}
.fig{max-width:100%;height:auto;display:block;margin:6px 0}.cap{color:#555;font-size:13px;margin:4px 0 8px}
.dl{display:inline-block;font-size:13px;margin-right:14px}table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f1f1f1}
details summary{cursor:pointer;font-size:13px;color:#246}.note{background:#fff6d6;border-left:4px solid #e0b000;padding:6px 10px;font-size:14px}
.warn{background:#fde8e8;border-left:4px solid #c33;padding:6px 10px;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.cell{font-size:11px;text-align:center;width:116px}
.cell img{width:112px;height:112px;image-rendering:auto;display:block}.ov{font-size:12px;text-align:center}
.ov img{width:300px;height:auto;display:block;border:1px solid #ccc}.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:middle;margin:0 4px 0 10px}
.grid-ranges{display:grid;grid-template-columns:130px repeat(var(--n),1fr);gap:8px;align-items:start}
.grid-ranges .lab{font-weight:600;padding-top:4px;border-top:1px solid #eee}
.grid-ranges .row{border-top:1px solid #eee;padding-top:4px;min-height:20px}
"""


def esc(v: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(v))


def png_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")





def csv_uri(csv_text: str) -> str:
    """``data:text/csv;base64,...`` of a CSV document."""
    return "data:text/csv;charset=utf-8;base64," + base64.b64encode(csv_text.encode("utf-8")).decode("ascii")


def download(name: str, csv_text: str, label: str | None = None) -> str:
    """A download link carrying the CSV itself."""
    return f"<a class='dl' download='{esc(name)}' href='{csv_uri(csv_text)}'>⬇ {esc(label or name)}</a>"


def html_table(df: Any, max_rows: int = 400) -> str:
    """The first ``max_rows`` rows of a DataFrame as an HTML table inside a collapsed <details>."""
    cols = list(df.columns)
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for row in df.head(max_rows).itertuples(index=False):
        body.append("<tr>" + "".join(f"<td>{esc('' if _nan(v) else v)}</td>" for v in row) + "</tr>")
    more = f" (first {max_rows} of {len(df)} rows; the download has all)" if len(df) > max_rows else ""
    return f"<details><summary>show the table{more}</summary><table><tr>{head}</tr>{''.join(body)}</table></details>"


def _nan(v: Any) -> bool:
    try:
        return bool(v != v)  # NaN and NA
    except (TypeError, ValueError):
        return False


def figure(png: bytes, alt: str, caption: str, downloads: Sequence[str], table: str = "") -> str:
    """An embedded figure, its caption, its download links and its table."""
    return (
        f"<img class='fig' alt='{esc(alt)}' src='{png_uri(png)}'>"
        f"<p class='cap'>{caption}</p><div>{''.join(downloads)}</div>{table}"
    )


def page(title: str, header_lines: Sequence[str], nav: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    """The whole document."""
    links = "".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t in nav)
    head = "".join(f"<p>{line}</p>" for line in header_lines)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{head}</header><nav>{links}</nav><main>{''.join(sections)}</main></body></html>"
    )
