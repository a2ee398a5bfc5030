"""Cross-cutting image steps shared by every path: rescale, display range, crops.

These are the only implementations: the service, the index builder, the
demo, the benchmarks and the tests call them.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from monitor.records import Cells, Frame


def rescale_factor(pixel_size_um: float, target_um: float) -> float:
    """Scale factor that brings ``pixel_size_um`` to ``target_um``.

    Nanolive 60x (0.19 um/px) to Lionheart 20x (0.322 um/px) gives 0.59.
    """
    return pixel_size_um / target_um


def resize(image: np.ndarray, shape_yx: tuple[int, int], labels: bool = False) -> np.ndarray:
    """Resize a 2-D or (Y, X, C) image to ``shape_yx``.

    Policy: area interpolation when shrinking (no aliasing), linear when
    growing; label images (``labels=True``) use exact nearest-neighbour
    sampling of pixel centres, keep their dtype (uint16, uint32, int64 ...)
    and never invent ids.
    """
    h, w = shape_yx
    if image.shape[:2] == (h, w):
        return image
    if labels:
        return _nearest(image, (h, w))
    shrinking = h < image.shape[0] or w < image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    src = image.astype(np.float32) if image.dtype not in (np.uint8, np.uint16, np.float32) else image
    return cv2.resize(src, (w, h), interpolation=interp)


def _nearest(image: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour by pixel centres: row i of the output samples row floor((i + 0.5) * H / h)."""
    h, w = shape_yx
    sh, sw = image.shape[:2]
    rows = np.minimum(((np.arange(h) + 0.5) * sh / h).astype(np.intp), sh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * sw / w).astype(np.intp), sw - 1)
    return image[rows[:, None], cols[None, :]]


def rescale(frame: Frame, target_um: float) -> Frame:
    """Resample every channel to ``target_um`` per pixel.

    Policy: a no-op within 0.1% (so a frame already at the common pixel size
    is never resampled); otherwise every channel goes to the same rounded
    shape with :func:`resize` and the frame's ``pixel_size_um`` becomes
    ``target_um``. Map labels back to the input grid with
    ``resize(labels, input_shape, labels=True)``.
    """
    f = rescale_factor(frame.pixel_size_um, target_um)
    if abs(f - 1.0) < 1e-3:
        return frame
    h, w = frame.shape_px
    shape = (max(1, round(h * f)), max(1, round(w * f)))
    channels = {name: resize(img, shape) for name, img in frame.channels.items()}
    return replace(frame, channels=channels, pixel_size_um=target_um, source_shape_yx=frame.source_shape_yx or (h, w))


def to_float(image: np.ndarray) -> np.ndarray:
    """Grey float32 of a 2-D or RGB(A) image (the three colour channels averaged, alpha ignored)."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float32).mean(axis=2)
    return img.astype(np.float32, copy=False)


def display_range(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """uint8 RGB (Y, X, 3) view of a frame channel.

    Grey images are stretched between percentiles so crops from 8-, 16- and
    32-bit instruments look alike; uint8 RGB images (stained smears) pass
    through unchanged so colour is kept.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.dtype == np.uint8:
        return np.ascontiguousarray(img[..., :3])
    grey = _stretch(img, low_pct, high_pct)
    return np.stack([grey, grey, grey], axis=2)  # np.repeat's bytes, sooner


def _stretch(img: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """The grey uint8 of :func:`display_range` (before the three channels are repeated).

    A 2-D uint8 or uint16 frame (every Lionheart / BioTek frame) takes the same numbers
    sooner, from its histogram: the two percentiles are numpy's own of the same values
    (:func:`histogram_percentiles`: numpy's steps on the two order statistics it reads, found
    by rank in the cumulative histogram), and every level is mapped once by the same float32
    arithmetic (a lookup table) instead of every pixel: the same bytes (tested against the
    general path), a tenth of the time.
    """
    if img.ndim == 2 and img.dtype in (np.uint8, np.uint16) and img.size:
        counts = np.bincount(img.ravel(), minlength=256)
        levels = np.arange(counts.size, dtype=np.float32)  # what to_float makes of each level
        lo, hi = histogram_percentiles(levels, counts, [low_pct, high_pct])
        if hi <= lo:
            hi = lo + 1.0
        lut = (np.clip((levels - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        return cv2.LUT(img, lut) if img.dtype == np.uint8 else np.take(lut, img)
    g = to_float(img)
    lo, hi = np.percentile(g, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((g - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _at_ranks(levels: np.ndarray, counts: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The values at ``ranks`` (0-based) of the sorted multiset "``levels[i]`` ``counts[i]`` times"
    (``levels`` ascending), without building it."""
    return levels[np.searchsorted(np.cumsum(counts), ranks, side="right")]


def histogram_percentiles(levels: np.ndarray, counts: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.percentile(np.repeat(levels, counts), q)`` (``q`` a list, the default linear method), the
    same float64 numbers, from the histogram: numpy's own steps on the only two order statistics
    each percentile reads (the virtual index ``(n - 1) q / 100``, the values at its floor and
    the next rank, the float64 interpolation from the nearer end). ``levels`` ascending,
    at least one count."""
    n = int(np.sum(counts))
    virtual = (n - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)
    below = np.floor(virtual)
    gamma = virtual - below
    prev = np.where(virtual >= n - 1, n - 1, below.astype(np.intp))
    nxt = np.minimum(prev + 1, n - 1)
    a, b = _at_ranks(levels, counts, np.stack([prev, nxt]))  # both ranks from one cumulative sum
    d = b - a
    return np.where(gamma >= 0.5, b - d * (1 - gamma), a + d * gamma)


def grey_median(grey: np.ndarray) -> float:
    """``np.median`` (the same number) of a uint8 array, from its histogram: the middle value, or the
    mean of the middle two (both small integers, so their float64 mean is exact, as numpy's)."""
    counts = np.bincount(np.ravel(grey), minlength=256)
    n = int(counts.sum())
    a, b = _at_ranks(np.arange(256, dtype=np.float64), counts, np.array([(n - 1) // 2, n // 2]))
    return float(a + b) / 2.0


def background_range(image: np.ndarray, mads: float = 15.0) -> np.ndarray:
    """uint8 RGB (Y, X, 3) view of a grey frame channel around its background level.

    The field's median (the background, where cells are a minority) maps to
    mid-grey and +-``mads`` median absolute deviations to black and white:
    the faint texture of a label-free cell keeps its contrast whatever bright
    debris or dark edges the field also holds (a percentile stretch spends
    its range on those). Colour (uint8 RGB) passes through unchanged.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.dtype == np.uint8:
        return np.ascontiguousarray(img[..., :3])
    g = to_float(img)
    med = float(np.median(g))
    mad = float(np.median(np.abs(g - med))) or float(g.std()) or 1.0
    u8 = (np.clip((g - med) / (2 * mads * mad) + 0.5, 0, 1) * 255).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=2)


def frame_view(image: np.ndarray, contrast: str = "percentile") -> np.ndarray:
    """The uint8 RGB view crops are cut from: :func:`display_range` (``percentile``) or :func:`background_range`."""
    return background_range(image) if contrast == "background" else display_range(image)


def crop_at(
    rgb: np.ndarray, centers_yx: np.ndarray, size: int, pad_value: int | np.ndarray | None = None
) -> np.ndarray:
    """(N, size, size, 3) uint8 crops centred on each (y, x), padded at the border.

    Policy: the centre is rounded to the nearest pixel and lands at index
    ``size // 2`` of the crop; padding repeats the image's median colour (or
    ``pad_value``) so a cell at the edge is not framed by a black bar that an
    encoder would notice. A centre outside the image gives an all-padding crop.
    """
    h, w = rgb.shape[:2]
    n = len(centers_yx)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    fill = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8) if pad_value is None else pad_value
    half = size // 2
    for i, (cy, cx) in enumerate(np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)):
        y0 = int(round(cy)) - half
        x0 = int(round(cx)) - half
        out[i] = fill
        sy0, sx0 = max(0, y0), max(0, x0)
        sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
        if sy1 > sy0 and sx1 > sx0:
            out[i, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


#: default context around a box: each side of the (square) crop window is the box's longer
#: side plus this fraction of it on both sides
BOX_MARGIN = 0.2


def box_windows(boxes_yxyx: np.ndarray, margin: float = BOX_MARGIN) -> np.ndarray:
    """(N, 3) ``(centre y, centre x, side)`` of the square window that frames each box.

    ``boxes_yxyx`` are ``(y0, x0, y1, x1)`` with exclusive ends (a one-pixel box is
    ``(y, x, y + 1, x + 1)``); the window is centred on the box and its side is the
    box's longer side times ``1 + 2 * margin`` (at least 2 px).
    """
    b = np.asarray(boxes_yxyx, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * (1.0 + 2.0 * margin)
    return np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0, np.maximum(side, 2.0)], axis=1)


def crop_boxes(
    rgb: np.ndarray, boxes_yxyx: np.ndarray, size: int, margin: float = BOX_MARGIN, pad_value: int | np.ndarray | None = None
) -> np.ndarray:
    """(N, size, size, 3) uint8 crops, each cell framed by its box (box framing).

    Policy: the square window of :func:`box_windows` (the box's longer side plus
    ``margin`` of it on each side, centred on the box; the aspect ratio is kept)
    is cut from ``rgb``, padded with the image's median colour (or ``pad_value``)
    where it leaves the image, and resized to ``size`` (area interpolation when
    shrinking, linear when growing). A cell thus fills the same share of every
    crop whatever its size and the frame's scale: what a labelled box
    (``index build`` on VOC frames) and a segmented cell (the service) give
    the encoder is framed the same way.
    """
    wins = box_windows(boxes_yxyx, margin)
    out = np.empty((len(wins), size, size, 3), dtype=np.uint8)
    fill = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8) if pad_value is None else pad_value
    for i, (cy, cx, side) in enumerate(wins):
        s = max(2, int(round(side)))
        # crop_at starts the window at round(centre) - s // 2: aim it at centre - s / 2
        shift = s // 2 - s / 2
        c = crop_at(rgb, np.array([[cy + shift, cx + shift]]), s, pad_value=fill)[0]
        out[i] = resize(c, (size, size))
    return out


def crop_cells(
    frame: Frame, cells: Cells, size: int = 224, blank_background: bool = False, framing: str = "window", margin: float = BOX_MARGIN,
    contrast: str = "percentile",
) -> np.ndarray:
    """(N, size, size, 3) uint8 crops of the primary channel, one per cell, in ``cells`` order.

    Policy: each crop is centred on the cell's mask centroid (rounded to the
    nearest pixel, which lands at index ``size // 2``), cut from the
    display-range view of the frame (:func:`display_range`), and padded with
    the frame's median colour where it leaves the image (:func:`crop_at`).
    With ``blank_background`` every pixel outside the cell's own mask (the
    background and neighbouring cells) is set to that same median colour, so
    an encoder sees one cell on a neutral field. A cell larger than the crop
    is cut, not shrunk: the crop keeps the common pixel size.

    ``contrast``: the view crops are cut from (:func:`frame_view`):
    ``percentile`` (default) or ``background`` (the field's background
    level +- 15 MADs, for faint label-free texture).

    ``framing="box"`` frames each cell by its bounding box instead
    (:func:`crop_boxes`: the box's longer side plus ``margin`` of it on each
    side, resized to ``size``), the way ``index build`` frames the labelled
    boxes of VOC frames, so reference and query crops match; ``blank_background``
    does not apply there.
    """
    rgb = frame_view(frame.image, contrast)
    # grey frames repeat one channel three times: take the median once (3x less work per frame)
    grey = rgb.ndim == 3 and rgb.shape[2] == 3 and frame.image.ndim == 2
    fill = np.repeat(grey_median(rgb[..., 0]), 3).astype(np.uint8) if grey else np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8)
    if framing == "box":
        boxes = np.array([c.bbox_px for c in cells.cells], dtype=np.float64).reshape(-1, 4)
        return crop_boxes(rgb, boxes, size, margin, pad_value=fill)
    centers = np.array([c.centroid_yx_px for c in cells.cells], dtype=np.float64).reshape(-1, 2)
    crops = crop_at(rgb, centers, size, pad_value=fill)
    if blank_background and len(cells):
        for i, c in enumerate(cells.cells):
            window = _crop_window(cells.labels, c.centroid_yx_px, size)
            crops[i][window != c.id] = fill
    return crops


def _crop_window(labels: np.ndarray, center_yx: tuple[float, float], size: int) -> np.ndarray:
    """The ``size`` x ``size`` window of a label image that :func:`crop_at` cuts, 0 outside the image."""
    h, w = labels.shape[:2]
    half = size // 2
    y0 = int(round(center_yx[0])) - half
    x0 = int(round(center_yx[1])) - half
    out = np.zeros((size, size), dtype=labels.dtype)
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = labels[sy0:sy1, sx0:sx1]
    return out
