"""The classical segmenter as it was before the speed work (commit a9df803), frozen as the speed baseline.

``bench/bench_segmenter_speed.py`` times it against the plugin in the same run
and compares their masks; nothing else uses it. A verbatim copy of
``segment_image`` (plugins/segmenters/classical.py), of the blob mode
(plugins/segmenters/blobs.py) with their helpers, and of
``monitor.segmentation.cells_from_labels``; only the imports changed:
``resolve_mode`` and ``min_area_um2`` (unchanged by the speed work) come from the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from cellmonitor_plugins.segmenters.classical import Options, min_area_um2, resolve_mode

__all__ = ["Options", "cells_from_labels", "segment_image"]


def cells_from_labels(
    labels: np.ndarray,
    pixel_size_um: float,
    min_area_um2: float = 0.0,
    max_area_um2: float = float("inf"),
    exclude_border: bool = False,
    relabel: bool = True,
) -> Any:
    """monitor.segmentation.cells_from_labels as it was (regionprops per instance)."""
    from skimage.measure import regionprops

    from monitor.records import Cell, Cells

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int32)
    cells: list[Cell] = []
    px_area = pixel_size_um**2
    h, w = labels.shape
    for rp in regionprops(labels.astype(np.int32, copy=False)):
        area = rp.area * px_area
        y0, x0, y1, x1 = rp.bbox
        if area < min_area_um2 or area > max_area_um2 or (
            exclude_border and (y0 == 0 or x0 == 0 or y1 == h or x1 == w)
        ):
            continue
        new_id = len(cells) + 1 if relabel else int(rp.label)
        out[rp.slice][rp.image] = new_id
        cy, cx = rp.centroid
        cells.append(Cell(new_id, (float(cy), float(cx)), float(area), (int(y0), int(x0), int(y1), int(x1))))
    return Cells(out, tuple(cells), pixel_size_um)

def _disk(radius_px: float) -> np.ndarray:
    import cv2

    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), sigma_px) if sigma_px > 0 else img


def _background(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """A wide Gaussian, computed on a grid decimated to ~sigma/4 (the result is smooth anyway)."""
    from monitor.imaging import resize

    k = int(sigma_px // 4)
    if k < 2:
        return _blur(img, sigma_px)
    h, w = img.shape
    small = resize(img, (max(1, h // k), max(1, w // k)))
    return resize(_blur(small, sigma_px / k), (h, w))


def pixel_noise(flat: np.ndarray, floor: float) -> float:
    """Robust noise of a flattened image from neighbour differences (MAD / sqrt 2),
    insensitive to structure wider than a pixel; at least ``floor`` (the quantisation step)."""
    d = np.diff(flat[::2], axis=1).ravel() if flat.shape[1] > 1 else flat.ravel()
    if d.size == 0:
        return floor
    mad = float(np.median(np.abs(d - np.median(d))))
    return max(1.4826 * mad / np.sqrt(2.0), floor, 1e-6)


def is_empty_field(flat: np.ndarray, noise: float, snr: float, min_px: float) -> bool:
    """True when fewer than a quarter of the smallest cell's pixels (``min_px``)
    depart from the background (the median) by more than ``snr`` x ``noise``:
    a flat, featureless or noise-only field, which holds no cell."""
    if snr <= 0:
        return False
    dev = np.abs(flat - np.float32(np.median(flat)))
    return int(np.count_nonzero(dev > snr * noise)) < 0.25 * min_px


def merge_weak_boundaries(labels: np.ndarray, edge: np.ndarray, threshold: float) -> np.ndarray:
    """Merge touching regions whose shared boundary has a mean ``edge`` value below ``threshold``.

    The weakest boundaries merge first (union-find); a boundary pixel pair
    scores the larger of its two ``edge`` values.
    """
    lab = labels.astype(np.int64, copy=False)
    a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
    b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
    e = np.concatenate(
        [np.maximum(edge[:, :-1], edge[:, 1:]).ravel(), np.maximum(edge[:-1, :], edge[1:, :]).ravel()]
    )
    m = (a != b) & (a > 0) & (b > 0)
    if not m.any():
        return labels
    n = int(lab.max()) + 1
    code = np.minimum(a[m], b[m]) * n + np.maximum(a[m], b[m])
    pairs, inv = np.unique(code, return_inverse=True)
    mean = np.bincount(inv, weights=e[m]) / np.bincount(inv)
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for k in np.argsort(mean):
        if mean[k] >= threshold:
            break
        x, y = find(int(pairs[k] // n)), find(int(pairs[k] % n))
        if x != y:
            parent[y] = x
    roots = np.array([find(i) for i in range(n)])
    return roots[lab].astype(labels.dtype, copy=False)


def _prepare(image: np.ndarray, pixel_size_um: float, o: Options) -> tuple[Any, ...] | None:
    """Step 1: (input image, working image, its flattened form, background, mode, working um/px, smallest cell in working px, lo, hi);
    None for an image with no range or an empty field (0 cells)."""
    from monitor.imaging import resize, to_float

    img0 = np.ascontiguousarray(to_float(image), dtype=np.float32)
    shape0 = img0.shape
    work = max(o.work_pixel_size_um, pixel_size_um)
    f = pixel_size_um / work
    img = img0
    if f < 0.999:
        img = resize(img0, (max(1, round(shape0[0] * f)), max(1, round(shape0[1] * f))))
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
        img0 = np.nan_to_num(img0, nan=0.0, posinf=0.0, neginf=0.0)
    lo, med, hi = (float(v) for v in np.percentile(img[::2, ::2], [0.5, 50, 99.5]))
    if not hi > lo:
        return None
    mode = resolve_mode(o.mode, (med - lo) / (hi - lo))
    img = (img - lo) / (hi - lo)
    bg = _background(img, o.background_um / work)
    flat = img - bg
    min_px = min_area_um2(o, mode) / work**2
    # a (nearly) flat field: normalising it to the full range would turn its noise into "cells"
    # (and the foreground into the whole field, whose distance map has no end): 0 cells at once
    step = 0.3 / (hi - lo) if np.issubdtype(np.asarray(image).dtype, np.integer) else 0.0
    if is_empty_field(flat, pixel_noise(flat, step), o.empty_snr, min_px):
        return None
    return img0, img, flat, bg, mode, work, min_px, lo, hi


@lru_cache(maxsize=8)
def line_kernels(length_px: int, n_angles: int) -> tuple[np.ndarray, ...]:
    """Flat line structuring elements of ``length_px`` (odd) at ``n_angles`` orientations over 180 degrees."""
    import cv2

    n = max(3, length_px | 1)
    c = (n - 1) / 2
    out = []
    for a in np.arange(n_angles) * np.pi / n_angles:
        k = np.zeros((n, n), np.uint8)
        dx, dy = np.cos(a) * c, np.sin(a) * c
        cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1, 1)
        out.append(k)
    return tuple(out)


def remove_lines(signal: np.ndarray, length_px: int, n_angles: int) -> np.ndarray:
    """``signal`` minus its largest grey opening by a line of ``length_px`` over ``n_angles`` orientations.

    An opening keeps only what a whole line fits into, so grid lines longer
    than ``length_px`` are removed and blobs shorter than it are kept whole.
    """
    import cv2

    lines = np.zeros_like(signal)
    for k in line_kernels(length_px, n_angles):
        opened = cv2.dilate(cv2.erode(signal, k, borderType=cv2.BORDER_REFLECT), k, borderType=cv2.BORDER_REFLECT)
        np.maximum(lines, opened, out=lines)
    return signal - lines


def _touches_edge(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, ...]) -> bool:
    return bool(rows.min() == 0 or cols.min() == 0 or rows.max() == shape[0] - 1 or cols.max() == shape[1] - 1)


#: width of the rim whose mean is compared with the whole region's (``ring``)
RING_UM = 1.4


#: distances to the frame edge beyond this are all "inside" (one cell and a half)
EDGE_CAP_UM = 20.0


@dataclass(frozen=True)
class Candidate:
    """One candidate cell on the working grid: its region (a mask within ``box``) and its measurements."""

    box: tuple[slice, slice]
    mask: np.ndarray
    features: np.ndarray  # float64, :data:`FEATURES` order
    edge_um: float  # the centroid's distance to the frame edge (not capped: the hand-set rule's border_um)


def region_features(mask: np.ndarray, flat: np.ndarray, score: np.ndarray, offset: tuple[int, int], shape: tuple[int, ...],
                    work_um: float, peak: float, n_seeds: int) -> tuple[np.ndarray, float]:
    """The :data:`FEATURES` of one region (a boolean mask within its bounding slice of ``flat`` / ``score``),
    and its centroid's distance to the frame edge in um (uncapped)."""
    from scipy import ndimage as ndi
    from skimage.measure import regionprops

    values = flat[mask]
    rp = regionprops(mask.astype(np.uint8))[0]
    rows, cols = np.nonzero(mask)
    rows, cols = rows + offset[0], cols + offset[1]
    cy, cx = rows.mean(), cols.mean()
    inner = ndi.binary_erosion(mask, iterations=max(1, round(RING_UM / work_um)))
    rim = mask & ~inner
    ring = float(flat[rim].mean() - values.mean()) if inner.any() and rim.any() else 0.0
    edge = float(min(cy, cx, shape[0] - 1 - cy, shape[1] - 1 - cx)) * work_um
    return np.array([
        np.log(max(peak, 1e-3)),
        np.log(len(values) * work_um**2),
        float(values.min()),
        float(np.percentile(values, 10)),
        float(np.median(values)),
        float(np.percentile(values, 90)),
        float(values.max()),
        float(values.std()),
        float(rp.solidity),
        float(rp.axis_major_length / max(rp.axis_minor_length, 1.0)),
        min(edge, EDGE_CAP_UM),
        float(_touches_edge(rows, cols, shape)),
        np.log(max(float(score[mask].mean()), 1e-3)),
        ring,
        np.log(max(n_seeds, 1)),
    ]), edge


FEATURES: tuple[str, ...] = (
    "log_peak", "log_area_um2", "dark_min", "dark_p10", "median", "bright_p90", "bright_max", "spread",
    "solidity", "axis_ratio", "edge_um", "touches_edge", "log_score_mean", "ring", "log_seeds",
)


#: column of each feature in :data:`FEATURES` order
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURES)}


def feature_matrix(cands: list[Candidate]) -> np.ndarray:
    """The candidates' :data:`FEATURES` as one (n, F) float64 array (n may be 0)."""
    return np.array([c.features for c in cands], dtype=np.float64).reshape(len(cands), len(FEATURES))


def is_cell(c: Candidate, o: Any, min_area_um2: float) -> bool:
    """The hand-set acceptance rule of step 6 for one candidate."""
    f, ix = c.features, FEATURE_INDEX
    if (np.exp(f[ix["log_area_um2"]]) < min_area_um2 * (1 - 1e-9)
            or f[ix["dark_min"]] > -o.min_dark or f[ix["dark_p10"]] > -o.min_dark_body or f[ix["solidity"]] < o.min_solidity):
        return False
    if f[ix["touches_edge"]]:
        return bool(c.edge_um >= o.border_um)
    return bool(f[ix["axis_ratio"]] <= o.max_axis_ratio)


def blob_candidates(flat: np.ndarray, work_um: float, o: Any, snr: float) -> list[Candidate]:
    """Steps 2-5 of the module docstring: every candidate cell whose seed peaks above ``snr``, measured.

    ``flat`` is the flattened image on the working grid of ``work_um`` um/px;
    ``o`` the classical segmenter's options (the blob fields).
    """
    import cv2
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    s = o.contrast_um / work_um
    mean = cv2.GaussianBlur(flat, (0, 0), s)
    contrast = np.sqrt(np.clip(cv2.GaussianBlur(flat * flat, (0, 0), s) - mean * mean, 0, None)).astype(np.float32)
    if o.line_um > 0:
        contrast = remove_lines(contrast, int(round(o.line_um / work_um)), o.line_angles)
    med = float(np.median(contrast))
    mad = max(1.4826 * float(np.median(np.abs(contrast - med))), 1e-6)
    score = (contrast - med) / mad
    smooth = cv2.GaussianBlur(score, (0, 0), o.cell_diameter_um / 4 / work_um)
    peaks = peak_local_max(smooth, min_distance=max(1, int(o.seed_distance_um / work_um)), threshold_abs=snr, exclude_border=False)
    if len(peaks) == 0:
        return []
    markers = np.zeros(flat.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    near = ndi.distance_transform_edt(markers == 0) <= 0.7 * o.cell_diameter_um / work_um
    regions = watershed(-smooth, markers, mask=((score > o.fg_snr) & near) | (markers > 0))
    out = []
    for i, sl in enumerate(ndi.find_objects(regions)):
        if sl is None:
            continue
        own = regions[sl] == i + 1
        sc = score[sl]
        cut = ndi.binary_fill_holes(own & (sc > max(o.fg_snr, o.fg_fraction * float(sc[own].max()))))
        pieces, k = ndi.label(cut)
        if k == 0:
            continue
        if k > 1:
            cut = pieces == int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
        peak = float(smooth[peaks[i, 0], peaks[i, 1]])
        feats, edge = region_features(cut, flat[sl], sc, (sl[0].start, sl[1].start), flat.shape, work_um, peak, len(peaks))
        out.append(Candidate(sl, cut, feats, edge))
    return out


def blob_labels(img: np.ndarray, flat: np.ndarray, work_um: float, o: Any, min_px: float, acceptance: Any = None) -> np.ndarray:
    """Instance labels (int32) of the blob cells of a normalised image ``img`` and its flattened ``flat``.

    Both on the working grid of ``work_um`` um/px; ``o`` is the classical
    segmenter's options (the blob fields), ``min_px`` the smallest cell in
    working pixels. Candidates (steps 2-5) are kept by the hand-set rule of
    step 6 (:func:`is_cell`), or, given an ``acceptance`` model
    (:class:`~cellmonitor_plugins.segmenters.acceptance.AcceptanceModel`,
    fitted on a lab's boxed frames), drawn at its own seed threshold and kept
    where it says so.
    """
    del img  # the flattened image carries everything used here
    labels = np.zeros(flat.shape, np.int32)
    if acceptance is None:
        cands = blob_candidates(flat, work_um, o, o.blob_snr)
        keep = [is_cell(c, o, min_px * work_um**2) for c in cands]
    else:
        cands = blob_candidates(flat, work_um, o, acceptance.candidate_snr)
        keep = acceptance.accept(feature_matrix(cands)).tolist()
    n = 0
    for c, k in zip(cands, keep, strict=True):
        if k:
            n += 1
            labels[c.box][c.mask] = n
    return labels


def segment_image(image: np.ndarray, pixel_size_um: float, o: Options, acceptance: Any = None) -> np.ndarray:
    """Instance labels (int32, 0 = background) of a 2-D image on its own pixel grid.

    The steps and their policy are described in the module docstring; the
    image is processed on a grid no finer than ``o.work_pixel_size_um`` and
    the labels are mapped back by nearest neighbour. ``acceptance``: a
    learned blob acceptance model (mode ``blobs`` only).
    """
    import cv2
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from monitor.imaging import resize

    shape0 = np.shape(image)[:2]
    prep = _prepare(image, pixel_size_um, o)
    if prep is None:
        return np.zeros(shape0, np.int32)
    img0, img, flat, bg, mode, work, min_px, lo, hi = prep
    shape0 = img0.shape
    empty = np.zeros(shape0, np.int32)
    if mode == "blobs":
        return resize(blob_labels(img, flat, work, o, min_px, acceptance), shape0, labels=True)

    if mode == "contrast" and o.native_contrast and img.shape != shape0:
        # fine texture of spread cytoplasm lives at the native resolution
        nflat = (img0 - lo) / (hi - lo) - resize(bg, shape0)
        s = o.contrast_um / pixel_size_um
        mean = _blur(nflat, s)
        signal = resize(np.sqrt(np.clip(_blur(nflat * nflat, s) - mean * mean, 0, None)), img.shape)
    elif mode == "contrast":
        s = o.contrast_um / work
        mean = _blur(flat, s)
        signal = np.sqrt(np.clip(_blur(flat * flat, s) - mean * mean, 0, None))
    else:
        signal = _blur(flat, o.contrast_um / work)
    if not float(signal.max()) > float(signal.min()):
        return empty
    t = float(threshold_otsu(signal)) * o.threshold_scale
    fg: np.ndarray = (signal > t).astype(np.uint8)
    if o.close_um > 0:
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _disk(o.close_um / work))
    fg = ndi.binary_fill_holes(fg).astype(np.uint8)
    if o.open_um > 0:
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _disk(o.open_um / work))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    fgb = keep[comp]
    if not fgb.any():
        return empty

    # background noise of the flattened image (robust), the unit of every brightness option
    bgv = flat[~fgb] if (~fgb).sum() > 100 else flat.ravel()
    noise = max(float(1.4826 * np.median(np.abs(bgv - np.median(bgv)))), 1e-6)
    sign = 1.0 if mode == "contrast" else -1.0

    seed_src = fgb.astype(np.uint8)
    if mode == "contrast" and o.halo_snr > 0:
        halo = _blur(flat, o.halo_smooth_um / work) > o.halo_snr * noise
        seed_src = (fgb & ~halo).astype(np.uint8)
        if o.halo_open_um > 0:
            seed_src = cv2.morphologyEx(seed_src, cv2.MORPH_OPEN, _disk(o.halo_open_um / work))
    dist = cv2.distanceTransform(seed_src, cv2.DIST_L2, 5) * work  # um
    # with no background pixel at all the transform is "infinite" (and h-maxima on it never
    # ends): bound it by the field's size, so every later step sees finite values
    np.minimum(dist, float(sum(dist.shape)) * work, out=dist)
    dist = _blur(dist, o.seed_smooth_um / work)
    # h-maxima (a grey reconstruction) dominates the run time: find them on a
    # grid of about a third of the seed smoothing, which that smoothing makes lossless enough
    seed_grid = max(work, o.seed_smooth_um / 3)
    if seed_grid > work * 1.25:
        small = (max(1, round(dist.shape[0] * work / seed_grid)), max(1, round(dist.shape[1] * work / seed_grid)))
        peaks = resize(h_maxima(resize(dist, small), o.seed_h_um).astype(np.uint8), dist.shape, labels=True) > 0
    else:
        peaks = h_maxima(dist, o.seed_h_um) > 0
    markers, _ = ndi.label(peaks & fgb)
    ridge = sign * _blur(flat, o.ridge_smooth_um / work) / (10.0 * noise)
    elevation = o.ridge_weight * ridge - 0.1 * dist
    labels = watershed(elevation, markers, mask=fgb, compactness=o.compactness).astype(np.int32)
    # foreground blobs that got no seed (all halo) are cells of their own
    orphans, k = ndi.label(fgb & (labels == 0))
    if k:
        labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    if o.merge_snr > 0:
        labels = merge_weak_boundaries(labels, sign * _blur(flat, o.halo_smooth_um / work) / noise, o.merge_snr)
    # watershed pieces below the smallest cell are specks or slivers, not cells
    sizes = np.bincount(labels.ravel())
    tiny = sizes < min_px
    tiny[0] = False
    if tiny.any():
        labels[tiny[labels]] = 0
    return resize(labels, shape0, labels=True)
