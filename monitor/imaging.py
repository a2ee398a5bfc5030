"""Cross-cutting image steps shared by every path: rescale, display range, crops, Otsu.

These are the only implementations: the service, the index builder, the
demo, the benchmarks and the tests call them.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from monitor.records import Cells, ControlSignal, Frame


def rescale_factor(pixel_size_um: float, target_um: float) -> float:
    """Scale factor that brings ``pixel_size_um`` to ``target_um``.

    Nanolive 60x (0.19 um/px) to Lionheart 20x (0.322 um/px) gives 0.59.
    """
    return pixel_size_um / target_um


def resize(image: np.ndarray, shape_yx: tuple[int, int], labels: bool = False) -> np.ndarray:
    """Resize to ``shape_yx``: area interpolation when shrinking, linear when growing,
    nearest neighbour for label images."""
    h, w = shape_yx
    if image.shape[:2] == (h, w):
        return image
    if labels:
        interp = cv2.INTER_NEAREST
        src = image.astype(np.int32) if image.dtype not in (np.uint8, np.uint16, np.int16, np.float32) else image
        out = cv2.resize(src, (w, h), interpolation=interp)
        return out.astype(image.dtype, copy=False)
    shrinking = h < image.shape[0] or w < image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    src = image.astype(np.float32) if image.dtype not in (np.uint8, np.uint16, np.float32) else image
    return cv2.resize(src, (w, h), interpolation=interp)


def rescale(frame: Frame, target_um: float) -> Frame:
    """Resample every channel to ``target_um`` per pixel (no-op within 0.1%)."""
    f = rescale_factor(frame.pixel_size_um, target_um)
    if abs(f - 1.0) < 1e-3:
        return frame
    h, w = frame.shape_px
    shape = (max(1, round(h * f)), max(1, round(w * f)))
    channels = {name: resize(img, shape) for name, img in frame.channels.items()}
    return replace(frame, channels=channels, pixel_size_um=target_um)


def to_float(image: np.ndarray) -> np.ndarray:
    """Grey float32 of a 2-D or RGB image (RGB averaged)."""
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
    g = to_float(img)
    lo, hi = np.percentile(g, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    u8 = (np.clip((g - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=2)


def crop_at(rgb: np.ndarray, centers_yx: np.ndarray, size: int, pad_value: int | None = None) -> np.ndarray:
    """(N, size, size, 3) uint8 crops centred on each (y, x), padded at the border.

    Padding repeats the image's median colour (or ``pad_value``), so a cell at
    the edge is not framed by a black bar that an encoder would notice.
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


def crop_cells(frame: Frame, cells: Cells, size: int = 224, blank_background: bool = False) -> np.ndarray:
    """Crops of the primary channel centred on each cell's centroid.

    With ``blank_background`` the pixels outside the cell's own mask are set
    to the image median.
    """
    rgb = display_range(frame.image)
    centers = np.array([c.centroid_yx_px for c in cells.cells], dtype=np.float64).reshape(-1, 2)
    crops = crop_at(rgb, centers, size)
    if blank_background and len(cells):
        lab = cells.labels
        fill = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8)
        for i, c in enumerate(cells.cells):
            m = _crop_mask(lab == c.id, c.centroid_yx_px, size)
            crops[i][~m] = fill
    return crops


def _crop_mask(mask: np.ndarray, center_yx: tuple[float, float], size: int) -> np.ndarray:
    h, w = mask.shape
    half = size // 2
    y0 = int(round(center_yx[0])) - half
    x0 = int(round(center_yx[1])) - half
    out = np.zeros((size, size), dtype=bool)
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    return out


def otsu_control(image: np.ndarray, pixel_size_um: float, channel: str, min_region_px: int = 4) -> ControlSignal:
    """Paper section 3.4: Otsu threshold, binary mask, label connected regions, sum their area.

    Regions smaller than ``min_region_px`` pixels are dropped as noise. A flat
    image (no contrast) has no foreground.
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    g = to_float(image)
    if float(g.max()) <= float(g.min()):
        return ControlSignal(channel, float(g.min()), 0.0, 0.0, 0)
    t = float(threshold_otsu(g))
    lab = label(g > t, connectivity=2)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= min_region_px
    area_px = int(sizes[keep].sum())
    return ControlSignal(
        channel=channel,
        threshold=t,
        area_um2=area_px * pixel_size_um**2,
        area_fraction=area_px / g.size,
        n_regions=int(keep.sum()),
    )
