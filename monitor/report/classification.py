"""Human-facing renderings: text tables, the confusion-matrix PNG, the classify HTML page.

The HTML page is self-contained (images embedded as base64 PNG) so it can be
mailed or opened from a network share; every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput
from monitor.imageio import png_bytes
from monitor.index.dataset import crops_for, parse_voc, read_image
from monitor.index.evaluate import Evaluation, Scores
from monitor.report.overlay import draw_overlay, draw_scale_bar, mark_cell

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


def confusion_size_in(n_pred: int, n_true: int) -> tuple[float, float]:
    """Figure size (inches) of a confusion matrix: cells of a readable size at any class count,
    never smaller than what the axis labels, colour bar and title need."""
    return max(5.2, 2.6 + 0.62 * n_pred), max(4.4, 2.2 + 0.55 * n_true)


def confusion_png(s: Scores, path: Path, dpi: int = 110) -> Path:
    """Write the confusion matrix as a PNG (matplotlib, Agg backend).

    Colour: each row normalised (recall per true class); text: the counts,
    white on dark cells. The size grows with the class count
    (:func:`confusion_size_in`) and the figure is saved with a tight bounding
    box, so the title (the headline accuracy) and the class names are never cut.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = s.confusion.astype(float)
    norm = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    n_pred, n_true = len(s.pred_classes), len(s.true_classes)
    fig, ax = plt.subplots(figsize=confusion_size_in(n_pred, n_true))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fs = 11 if max(n_pred, n_true) <= 6 else 9
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=fs, color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xticks(range(n_pred), s.pred_classes, rotation=45 if n_pred > 2 else 0, ha="right" if n_pred > 2 else "center")
    ax.set_yticks(range(n_true), s.true_classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.suptitle(f"{s.method}: macro accuracy {s.macro_accuracy:.3f}, accuracy {s.accuracy:.3f} (n = {s.n})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.25)
    plt.close(fig)
    return path


def crop_geometry(
    image_shape: tuple[int, ...], prep: Any, box_xyxy: tuple[float, float, float, float] | None = None
) -> tuple[float | None, tuple[float, float, float, float] | None]:
    """(um per crop pixel, the labelled box in crop pixels as ``(y0, x0, y1, x1)``) of the crop
    :func:`monitor.index.dataset.crops_for` cuts from an image of ``image_shape`` under ``prep``.

    The scale is None where the crop has no fixed scale (``cell`` framing
    normalises each cell's size); the box is None without a labelled box
    (class-folder images: the labelled cell is the one at the centre). The
    data's pixel size is ``prep.source_pixel_size_um``, or the target when
    the data is already at it.
    """
    src = prep.source_pixel_size_um or prep.pixel_size_um
    n = prep.crop_px
    if box_xyxy is not None:
        bx0, by0, bx1, by1 = box_xyxy
        bw, bh = bx1 - bx0, by1 - by0
        if prep.box_framing == "box":
            side = max(max(bw, bh) * (1 + 2 * prep.box_margin), 2.0)
            f = n / side  # crop px per source px
            um = src / f
        else:
            f = src / prep.pixel_size_um
            um = prep.pixel_size_um
        c = n / 2
        return um, (c - bh * f / 2, c - bw * f / 2, c + bh * f / 2, c + bw * f / 2)
    if prep.framing == "whole":
        return src * max(image_shape[0], image_shape[1]) / n, None
    if prep.framing == "cell":
        return None, None
    return prep.pixel_size_um, None


def annotate_crop(crop: np.ndarray, pixel_size_um: float | None, box_yxyx: tuple[float, float, float, float] | None = None, mark: bool = True) -> np.ndarray:
    """A crop for people: the labelled cell marked (box corners, or ticks at the centre) and a scale bar."""

    out = mark_cell(crop, box_yxyx) if mark else np.asarray(crop, np.uint8)
    if pixel_size_um:
        out = draw_scale_bar(out, pixel_size_um, corner="bottom-right")
    return out


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of a uint8 RGB (or grey) image."""

    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def classify_html(
    results: Sequence[dict[str, Any]],
    query_images: Sequence[np.ndarray | None],
    neighbour_images: Sequence[Sequence[np.ndarray | None]],
    title: str = "cellmonitor classify",
    overlays: Mapping[str, np.ndarray] | None = None,
    single_cell_references: bool = False,
) -> str:
    """A self-contained page: each query crop, its prediction and certainty, its nearest references.

    ``results`` are the dicts printed by ``cellmonitor classify --json``; a
    result with ``cells_found`` > 1 carries a warning that the image holds
    several cells (and ``overlays[image]``, the segmented image with each
    cell outlined by its state, when per-cell results were asked for).
    Images are shown as given: the caller marks the labelled cell and adds
    scale bars (:func:`annotate_crop`).
    """
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}section{border-bottom:1px solid #ccc;padding:1em 0}"
        "figure{display:inline-block;margin:4px;text-align:center;font-size:12px;vertical-align:top}img{width:128px;height:128px}"
        ".q img{width:192px;height:192px}.ov img{width:auto;height:auto;max-width:640px}.warn{color:#b00}"
        ".warnbox{background:#fde8e8;border-left:4px solid #c33;padding:6px 10px}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p>Cyan marks: the labelled cell of each reference crop (corners: its labelled box; ticks: the cell at the centre). "
        "Scale bars where the crop has a fixed scale.</p>",
    ]
    shown_overlay: set[str] = set()
    for r, qimg, nimgs in zip(results, query_images, neighbour_images, strict=True):
        cert = r["certainty"]
        parts.append("<section>")
        parts.append(f"<h2>{e(str(r['image']))}</h2>")
        found = r.get("cells_found")
        if found is not None and found > 1 and r.get("cell") is None:
            advice = ("The index's references are single-cell images, so this image is taken as one cell too."
                      if single_cell_references else "Run with <code>--per-cell</code> to classify each cell.")
            parts.append(f"<p class='warnbox'>The segmenter found {found} cells in this image; it was classified as one cell. {advice}</p>")
        src = str(r.get("source_image", r["image"]))
        if overlays and src in overlays and src not in shown_overlay:
            shown_overlay.add(src)
            parts.append(f"<p class='warnbox'>The segmenter found {found} cells in this image: each is classified below.</p>")
            parts.append(f"<figure class='ov'><img alt='cells by state' src='{png_data_uri(overlays[src])}'><figcaption>cells outlined by their call</figcaption></figure>")
        flag = " <span class='warn'>(uncertain: not a reliable call)</span>" if r.get("uncertain") else ""
        if r.get("unknown"):
            flag += " <span class='warn'>(unknown: farther from every reference than the index's calibrated distance)</span>"
        parts.append(f"<p>prediction <b>{e(r['label'])}</b>, certainty {cert:.2f}{flag}, k used {r['k_used']}</p>")
        if qimg is not None:
            parts.append(f"<figure class='q'><img alt='query' src='{png_data_uri(qimg)}'><figcaption>query</figcaption></figure>")
        for nb, img in zip(r["neighbours"], nimgs, strict=False):
            src_img = f"<img alt='{e(nb['label'])}' src='{png_data_uri(img)}'>" if img is not None else "<div style='width:128px;height:128px;background:#eee'></div>"
            name = nb.get("name") or f"#{nb['id']}"
            parts.append(f"<figure>{src_img}<figcaption>{e(nb['label'])}<br>d={nb['distance']:.3g}<br>{e(str(name))}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def reference_crop(index: Any, name: str | None, prep: Any) -> np.ndarray | None:
    """The crop a reference was embedded from, if its source file is still at the recorded data root,
    with its labelled cell marked and a scale bar (:func:`annotate_crop`); None when it is gone."""
    root = (index.preprocessing or {}).get("data_root")
    if not name or not root:
        return None
    rel, _, box = name.partition("#")
    path = Path(root) / rel
    try:
        img = read_image(path)
        if box:
            _, boxes = parse_voc(path.with_suffix(".xml"))
            b = boxes[int(box)]
            return annotate_crop(crops_for(img, prep, (b,))[0], *crop_geometry(img.shape, prep, b))
        return annotate_crop(crops_for(img, prep)[0], *crop_geometry(img.shape, prep))
    except (BadInput, OSError, ValueError, IndexError):
        return None


def query_overlays(sources: Mapping[str, Any], results: Sequence[Mapping[str, Any]], states: Any) -> dict[str, np.ndarray]:
    """One overlay per multi-cell query image (``sources``: image -> (frame, cells)), each cell
    coloured by its call and numbered as in ``results``."""
    out = {}
    for src, (frame, cs) in sources.items():
        rows = [i for i, r in enumerate(results) if r.get("source_image") == src]
        out[src] = draw_overlay(frame.image, cs.labels, states.predicted[rows], states.classes, frame.pixel_size_um,
                                cell_ids=[results[i]["cell"] for i in rows], uncertain=states.uncertain[rows])
    return out
