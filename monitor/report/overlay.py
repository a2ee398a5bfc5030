"""Drawing for people: cell outlines coloured by state, scale bars, legends, crop marks.

Pure functions on arrays (uint8 RGB out), no I/O: the ``overlay`` command, the
run report, ``classify --html`` and (later) the service's optional per-frame
overlay all call them.

Colours follow the canonical state of a class (:data:`STATE_RGB`, from the
Okabe-Ito colour-blind-safe palette): live green, apoptotic yellow, necrotic
purple, dead vermillion, other sky blue. A class whose name is not a canonical
state takes its role's colour when ``roles`` maps it, else the next colour of
:data:`EXTRA_RGB`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from monitor.imaging import display_range

#: colour of each canonical state (Okabe-Ito)
STATE_RGB: dict[str, tuple[int, int, int]] = {
    "live": (0, 158, 115),
    "apoptotic": (240, 228, 66),
    "necrotic": (204, 121, 167),
    "dead": (213, 94, 0),
    "other": (86, 180, 233),
}
#: colours for classes that map to no canonical state
EXTRA_RGB: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178), (230, 159, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
    (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (200, 200, 200),
)
#: the mark of the labelled cell in a reference crop
MARK_RGB = (0, 230, 255)
#: scale-bar lengths tried, in um (the longest that fits in a fifth of the width wins)
NICE_UM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000)


def class_colours(classes: Sequence[str], roles: Mapping[str, str] | None = None) -> dict[str, tuple[int, int, int]]:
    """RGB colour of every class (module docstring): canonical name, else its role, else a spare colour."""
    out: dict[str, tuple[int, int, int]] = {}
    spare = 0
    for c in classes:
        role = c.casefold() if c.casefold() in STATE_RGB else (roles or {}).get(c, "other")
        if role != "other" or c.casefold() == "other":  # many classes share "other": they get distinct colours
            out[c] = STATE_RGB.get(role, EXTRA_RGB[0])
        else:
            out[c] = EXTRA_RGB[spare % len(EXTRA_RGB)]
            spare += 1
    return out


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB view of any frame channel (percentile-stretched grey, colour kept)."""

    return np.array(display_range(image), dtype=np.uint8, copy=True)


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """DejaVu Sans (shipped with matplotlib, a core dependency: it has the micro sign), else PIL's default."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _um() -> str:
    return "µm" if "DejaVu" in str(getattr(_font(12), "path", "")) else "um"


def _text(rgb: np.ndarray, xy: tuple[int, int], text: str, size: int, fill: tuple[int, int, int], stroke: tuple[int, int, int] | None = (0, 0, 0)) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb)
    ImageDraw.Draw(im).text(xy, text, font=_font(size), fill=fill, stroke_width=1 if stroke else 0, stroke_fill=stroke)
    return np.asarray(im).copy()


def _text_size(text: str, size: int) -> tuple[int, int]:
    x0, y0, x1, y1 = _font(size).getbbox(text)
    return int(x1 - x0), int(y1)


def nice_length_um(width_px: int, pixel_size_um: float, share: float = 0.2) -> float:
    """The longest of :data:`NICE_UM` no longer than ``share`` of the image width (at least the shortest)."""
    fits = [v for v in NICE_UM if v / pixel_size_um <= share * width_px]
    return float(fits[-1] if fits else NICE_UM[0])


def draw_scale_bar(rgb: np.ndarray, pixel_size_um: float, length_um: float | None = None, corner: str = "bottom-left") -> np.ndarray:
    """A white bar with a black edge and its length in um, in a corner of ``rgb`` (a copy).

    The bar is ``length_um / pixel_size_um`` pixels long (rounded), so it is
    exact on the image's own grid; ``length_um`` defaults to
    :func:`nice_length_um`.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True)
    if not pixel_size_um > 0:
        return out
    h, w = out.shape[:2]
    um = length_um if length_um is not None else nice_length_um(w, pixel_size_um)
    n = max(1, int(round(um / pixel_size_um)))
    thick = max(2, h // 90)
    pad = max(4, w // 40)
    size = max(10, min(28, w // 24))
    label = f"{um:g} {_um()}"
    tw, th = _text_size(label, size)
    x0 = pad if corner.endswith("left") else w - pad - max(n, tw)
    y1 = h - pad
    y0 = y1 - thick
    out[max(0, y0 - 1) : min(h, y1 + 1), max(0, x0 - 1) : min(w, x0 + n + 1)] = 0
    out[y0:y1, x0 : x0 + n] = 255
    return _text(out, (x0 + max(0, (n - tw) // 2), max(0, y0 - th - 3)), label, size, (255, 255, 255))


def outlines(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean mask of the inner boundary of every labelled region, ``thickness`` pixels wide."""
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    # a pixel is on the outline when a 4-neighbour holds another label
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge &= lab != 0
    if thickness > 1:
        edge = ndi.binary_dilation(edge, iterations=thickness - 1) & (lab != 0)
    return edge


def draw_legend(rgb: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]], corner: str = "top-right") -> np.ndarray:
    """A legend box (swatch and text per entry) on a dark translucent panel in a corner (a copy)."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    if not entries:
        return out
    h, w = out.shape[:2]
    size = max(10, min(22, w // 32))
    line = size + size // 2
    sw = size
    tw = max(_text_size(t, size)[0] for t, _ in entries)
    bw, bh = sw + tw + 3 * (size // 2) + 4, line * len(entries) + size // 2
    pad = max(4, w // 60)
    x0 = w - pad - bw if corner.endswith("right") else pad
    y0 = pad if corner.startswith("top") else h - pad - bh
    x0, y0 = max(0, x0), max(0, y0)
    box = out[y0 : y0 + bh, x0 : x0 + bw].astype(np.float32)
    out[y0 : y0 + bh, x0 : x0 + bw] = (box * 0.35).astype(np.uint8)
    for i, (text, colour) in enumerate(entries):
        ty = y0 + size // 4 + i * line + (line - sw) // 2
        out[ty : ty + sw, x0 + size // 2 : x0 + size // 2 + sw] = colour
        out = _text(out, (x0 + sw + size, ty - 1), text, size, (255, 255, 255), stroke=None)
    return out


def draw_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    states: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    pixel_size_um: float,
    *,
    cell_ids: Sequence[int] | np.ndarray | None = None,
    uncertain: Sequence[bool] | np.ndarray | None = None,
    unknown: Sequence[bool] | np.ndarray | None = None,
    roles: Mapping[str, str] | None = None,
    thickness: int | None = None,
    legend: bool = True,
    scale_bar: bool = True,
    title: str | None = None,
) -> np.ndarray:
    """uint8 RGB (Y, X, 3): ``image`` with each cell's outline in its state's colour.

    Parameters
    ----------
    image
        The frame channel that was segmented (2-D of any dtype, or RGB), on the
        grid of ``labels``.
    labels
        Instance label image (0 = background).
    states
        Predicted class index of each cell (into ``classes``).
    classes
        Class names of the index.
    pixel_size_um
        Pixel size of ``image``; the scale bar is drawn from it.
    cell_ids
        Label id of each entry of ``states`` (default ``1..N``); a labelled
        region with no entry is outlined in grey.
    uncertain
        Cells counted as uncertain get a white dot at their centroid.
    unknown
        Cells farther from every reference than the index's calibrated
        distance: outlined in grey whatever they were called, and counted
        apart in the legend, so a frame of unknown cells never looks sure.
    roles
        Canonical state of each class (colours, :func:`class_colours`).
    thickness
        Outline width in pixels (default: 1 px per 350 px of the shorter side, at least 2).
    legend, scale_bar, title
        Legend with each class's colour and count (top right), scale bar
        (bottom left), a title line (top left).
    """
    from scipy import ndimage as ndi

    rgb = to_rgb(image)
    lab = np.asarray(labels)
    if lab.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"labels {lab.shape[:2]} and image {rgb.shape[:2]} are not on one grid")
    st = np.asarray(states, dtype=np.int64).reshape(-1)
    ids = np.arange(1, len(st) + 1) if cell_ids is None else np.asarray(cell_ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(st):
        raise ValueError(f"{len(st)} states for {len(ids)} cell ids")
    colours = class_colours(classes, roles)
    palette = np.array([colours[c] for c in classes] + [(128, 128, 128)], dtype=np.uint8)  # last: no state
    lut = np.full(int(max(lab.max(initial=0), ids.max(initial=0))) + 1, len(classes), dtype=np.int64)
    lut[ids] = np.where((st >= 0) & (st < len(classes)), st, len(classes))
    unk = np.asarray(unknown, bool).reshape(-1) if unknown is not None and len(ids) else np.zeros(len(ids), bool)
    lut[ids[unk]] = len(classes)  # grey: not like any reference
    t = thickness or max(2, min(rgb.shape[:2]) // 350)
    edge = outlines(lab, t)
    rgb[edge] = palette[lut[lab[edge]]]
    if uncertain is not None and len(ids):
        unc = np.asarray(uncertain, bool).reshape(-1)
        centres = ndi.center_of_mass(np.ones_like(lab), lab, ids[unc]) if unc.any() else []
        r = max(2, t + 1)
        for cy, cx in centres:
            y, x = int(round(cy)), int(round(cx))
            rgb[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = 255
    if legend:
        n = np.bincount(st[(st >= 0) & (st < len(classes))], minlength=len(classes)) if len(st) else np.zeros(len(classes), int)
        entries = [(f"{c} ({int(k)})", colours[c]) for c, k in zip(classes, n, strict=True)]
        if unk.any():
            entries.append((f"unknown ({int(unk.sum())} of {len(ids)}): grey, unlike every reference", (128, 128, 128)))
        if uncertain is not None and np.asarray(uncertain, bool).any():
            entries.append((f"uncertain ({int(np.asarray(uncertain, bool).sum())}): white dot", (255, 255, 255)))
        rgb = draw_legend(rgb, entries)
    if scale_bar:
        rgb = draw_scale_bar(rgb, pixel_size_um)
    if title:
        size = max(10, min(22, rgb.shape[1] // 32))
        rgb = _text(rgb, (max(4, rgb.shape[1] // 60), max(4, rgb.shape[1] // 60)), title, size, (255, 255, 255))
    return rgb


def mark_cell(crop: np.ndarray, box_yxyx: tuple[float, float, float, float] | None = None, colour: tuple[int, int, int] = MARK_RGB) -> np.ndarray:
    """Mark the cell a crop is about (a copy): corner brackets around ``box_yxyx`` (crop pixels),
    or, without a box, four ticks pointing at the crop's centre, leaving the cell itself uncovered."""
    out = np.array(crop, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    t = max(1, min(h, w) // 90)
    if box_yxyx is not None:
        y0, x0, y1, x1 = (int(round(v)) for v in box_yxyx)
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(h, y1), min(w, x1)
        arm = max(3, min(y1 - y0, x1 - x0) // 4)
        for yy in (y0, y1 - t):
            out[yy : yy + t, x0 : x0 + arm] = colour
            out[yy : yy + t, x1 - arm : x1] = colour
        for xx in (x0, x1 - t):
            out[y0 : y0 + arm, xx : xx + t] = colour
            out[y1 - arm : y1, xx : xx + t] = colour
        return out
    cy, cx = h // 2, w // 2
    gap, arm = min(h, w) // 6, min(h, w) // 10
    out[cy - t : cy + t + 1, max(0, cx - gap - arm) : cx - gap] = colour
    out[cy - t : cy + t + 1, cx + gap + 1 : cx + gap + arm + 1] = colour
    out[max(0, cy - gap - arm) : cy - gap, cx - t : cx + t + 1] = colour
    out[cy + gap + 1 : cy + gap + arm + 1, cx - t : cx + t + 1] = colour
    return out


def border(crop: np.ndarray, colour: tuple[int, int, int], width: int = 3) -> np.ndarray:
    """``crop`` with a frame of ``colour`` (a copy): a gallery crop shows its call at a glance."""
    out = np.array(crop, dtype=np.uint8, copy=True)
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out
