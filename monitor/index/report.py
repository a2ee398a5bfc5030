"""Human-facing renderings: text tables, the confusion-matrix PNG, the classify HTML page.

The HTML page is self-contained (images embedded as base64 PNG) so it can be
mailed or opened from a network share; every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitor.index.evaluate import Evaluation, Scores

log = logging.getLogger(__name__)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown-compatible pipe table (floats to 3 decimals)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(out)


def confusion_table(s: Scores) -> str:
    """The confusion matrix as aligned text (rows: true class, columns: predicted)."""
    headers = ["true \\ predicted", *s.pred_classes]
    rows = [[t, *[int(v) for v in s.confusion[i]]] for i, t in enumerate(s.true_classes)]
    return table(headers, rows)


def evaluation_text(ev: Evaluation) -> str:
    """Summary, per-class accuracy of both methods and the EWC confusion matrix."""
    p = ev.params
    lines = [
        f"cells evaluated: {ev.ewc.n}",
        f"EWC: k {p.k_min}..{p.k_max}, entropy threshold {p.entropy_threshold:g}, reweight {'on' if p.reweight else 'off'}",
        "",
        table(
            ["method", "macro accuracy", "accuracy", "mean k"],
            [[s.method, s.macro_accuracy, s.accuracy, s.mean_k] for s in (ev.ewc, ev.baseline)],
        ),
        "",
        table(["class", "EWC", ev.baseline.method], [[c, ev.ewc.per_class[c], ev.baseline.per_class[c]] for c in ev.ewc.true_classes]),
        "",
        "EWC confusion matrix:",
        confusion_table(ev.ewc),
    ]
    return "\n".join(lines)


def confusion_png(s: Scores, path: Path) -> Path:
    """Write the confusion matrix as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = s.confusion.astype(float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(s.pred_classes), 1.0 + 0.6 * len(s.true_classes)))
    ax.imshow(c / np.maximum(c.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(s.pred_classes)), s.pred_classes, rotation=45, ha="right")
    ax.set_yticks(range(len(s.true_classes)), s.true_classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{s.method}: macro accuracy {s.macro_accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of a uint8 RGB (or grey) image."""
    import cv2

    img = np.asarray(rgb)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def classify_html(results: Sequence[dict[str, Any]], query_images: Sequence[np.ndarray | None], neighbour_images: Sequence[Sequence[np.ndarray | None]], title: str = "cellmonitor classify") -> str:
    """A self-contained page: each query crop, its prediction and certainty, its nearest references.

    ``results`` are the dicts printed by ``cellmonitor classify --json``.
    """
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}section{border-bottom:1px solid #ccc;padding:1em 0}"
        "figure{display:inline-block;margin:4px;text-align:center;font-size:12px}img{width:112px;height:112px;image-rendering:pixelated}"
        ".q img{width:180px;height:180px}.warn{color:#b00}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for r, qimg, nimgs in zip(results, query_images, neighbour_images, strict=True):
        cert = r["certainty"]
        parts.append("<section>")
        parts.append(f"<h2>{e(str(r['image']))}</h2>")
        flag = " <span class='warn'>(uncertain)</span>" if r.get("uncertain") else ""
        parts.append(f"<p>prediction <b>{e(r['label'])}</b>, certainty {cert:.2f}{flag}, k used {r['k_used']}</p>")
        if qimg is not None:
            parts.append(f"<figure class='q'><img alt='query' src='{png_data_uri(qimg)}'><figcaption>query</figcaption></figure>")
        for nb, img in zip(r["neighbours"], nimgs, strict=False):
            src = f"<img alt='{e(nb['label'])}' src='{png_data_uri(img)}'>" if img is not None else "<div style='width:112px;height:112px;background:#eee'></div>"
            name = nb.get("name") or f"#{nb['id']}"
            parts.append(f"<figure>{src}<figcaption>{e(nb['label'])}<br>d={nb['distance']:.3g}<br>{e(str(name))}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
