"""Exact, faster stand-ins for the scikit-image / scipy steps of the classical segmenter.

Each function gives the same answer as the library call named in its
docstring, to the bit (one exception, said where it is: an axis ratio equal
to float rounding), only sooner: OpenCV where it has the same operation,
numba where the library sorts every pixel or pads and converts the whole
frame, plain numpy where the library's general machinery costs more than the
arithmetic. Profiled on a Lionheart-size frame (1224 x 904 px), these steps
were most of the segmenter's time (``bench/results/segmenter_speed.md``).
``tests/unit/test_segmenter_fast_paths.py`` compares each with the installed
library's call, and the whole segmenter with every call swapped back.

The numba kernels (:mod:`._jit`) compile on first use and are cached on disk:
the service's warm-up frame pays for the compilation, never a real one.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h)`` (8-connected) for a float image, as uint8.

    The same definition (the image minus its grey reconstruction by dilation
    from ``image - h``, a float image's resolution subtracted as scikit-image
    does, is at least ``h``); the reconstruction is Vincent's hybrid
    raster-scan + queue algorithm (numba) instead of a sort of every pixel.
    A reconstruction takes and compares existing values only, so the result
    is the same to the bit.
    """
    from cellmonitor_plugins.segmenters._jit import reconstruct_dilation

    image = np.ascontiguousarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"h_maxima: a float image is expected (got {image.dtype})")
    if h > np.ptp(image):
        return np.zeros(image.shape, dtype=np.uint8)
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    shifted = image - h - resolution
    rec = reconstruct_dilation(np.ascontiguousarray(shifted, dtype=image.dtype), image)
    return ((image - rec) >= h).astype(np.uint8)


def watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask)`` (4-connected, no compactness).

    The same algorithm step for step (:func:`._jit.watershed_4`: the same
    binary heap, the same order of pushes, ties broken the same way), compiled,
    without scikit-image's padded float64 copies of the whole frame.
    """
    from cellmonitor_plugins.segmenters._jit import watershed_4

    m = np.ascontiguousarray(mask, dtype=bool)
    labels = np.ascontiguousarray(np.asarray(markers) * m)
    img = np.asarray(image)
    # values are compared as float64, as scikit-image converts them (float32 ones exactly, on the fly)
    img = np.ascontiguousarray(img if img.dtype in (np.float32, np.float64) else img.astype(np.float64))
    watershed_4(img, labels, m)
    return labels


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (holes: background not 4-connected to the edge), as bool.

    One OpenCV flood fill of the background from outside the frame.
    """
    import cv2

    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask.astype(bool)
    cv2.floodFill(pad, None, (0, 0), 2, flags=4)
    return pad[1:-1, 1:-1] != 2


def within_distance(points_rc: np.ndarray, shape: tuple[int, int], radius_px: float) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(~points) <= radius_px`` for the (n, 2) pixels ``points_rc``
    of an image of ``shape``: the pixels within a Euclidean distance of one of them.

    The union of one disc per point (the offsets whose float64 distance is
    within ``radius_px``, the comparison scipy makes), stamped where the
    points are: a few seeds on a large frame need no transform of every pixel.
    """
    out = np.zeros(shape, bool)
    if len(points_rc) == 0:
        return out
    r = int(np.floor(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = np.sqrt((dy * dy + dx * dx).astype(np.float64)) <= radius_px
    h, w = shape
    for y, x in np.asarray(points_rc, dtype=np.int64):
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        out[y0:y1, x0:x1] |= disc[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
    return out


def peak_local_max(image: np.ndarray, min_distance: int, threshold_abs: float) -> np.ndarray:
    """``skimage.feature.peak_local_max(image, min_distance=..., threshold_abs=..., exclude_border=False)``: (n, 2) rows, cols.

    Peaks: pixels equal to the maximum of their ``2 min_distance + 1`` square
    (OpenCV's dilation instead of scipy's maximum filter: the same maximum,
    the frame's edge included) and above ``threshold_abs``; taken from the
    highest down (ties in row-major order), each suppressing the later ones
    closer than ``min_distance`` (Chebyshev), as scikit-image does.
    """
    import cv2
    from cellmonitor_plugins.segmenters._jit import greedy_spacing

    img = np.ascontiguousarray(image)
    size = 2 * min_distance + 1
    mx = cv2.dilate(img, np.ones((size, size), np.uint8)) if size > 1 and img.size > 1 else img
    cand = img == mx
    if cand.all():
        cand[:] = False
    cand &= img > threshold_abs
    coord = np.argwhere(cand)
    order = np.argsort(-img[cand], kind="stable")
    coord = np.ascontiguousarray(coord[order])
    if min_distance > 1 and len(coord) > 1:
        coord = coord[greedy_spacing(coord, float(min_distance))]
    return coord


def convex_area(mask: np.ndarray) -> int:
    """``np.sum(skimage.morphology.convex_hull_image(mask))``: the pixels whose centres lie in the
    convex hull of ``mask``'s pixel squares' edge midpoints, edges included.

    The hull of the same points by OpenCV instead of qhull, from the first and
    last pixel of each row only (every other pixel lies between them, so the
    hull is the same), then scikit-image's own point-in-polygon count.
    """
    import cv2
    from skimage.measure import grid_points_in_poly

    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0
    step = np.flatnonzero(np.diff(rows))
    ends = np.concatenate([[0], step + 1, step, [rows.size - 1]])
    diamond = np.array([[-0.5, 0], [0.5, 0], [0, -0.5], [0, 0.5]], np.float32)
    pts = (np.stack([cols[ends], rows[ends]], 1).astype(np.float32)[:, None, :] + diamond[None]).reshape(-1, 2)
    hull = cv2.convexHull(pts)[:, 0, ::-1].astype(np.float64)  # (row, col) vertices, in order
    return int(np.count_nonzero(grid_points_in_poly(mask.shape, hull, binarize=False)))


def axis_ratio(rows: np.ndarray, cols: np.ndarray) -> float:
    """``axis_major_length / max(axis_minor_length, 1)`` of ``skimage.measure.regionprops`` for the
    pixels (rows, cols): four times the square roots of the eigenvalues of the second central
    moments (the same formula in closed form; the sums in another order, so equal to float
    rounding, some 1e-15)."""
    n = rows.size
    dr = rows - rows.mean()
    dc = cols - cols.mean()
    a, b, c = float(dc @ dc) / n, float(dr @ dc) / n, float(dr @ dr) / n  # skimage's tensor [[mu02, -mu11], [-mu11, mu20]] / mu00
    mid, half = (a + c) / 2, float(np.hypot((a - c) / 2, b))
    major, minor = 4 * np.sqrt(max(mid + half, 0.0)), 4 * np.sqrt(max(mid - half, 0.0))
    return float(major / max(minor, 1.0))


def median_sorted(sorted_values: np.ndarray) -> Any:
    """``np.median(values)`` (the same numpy scalar) of the non-empty, finite ``values`` given sorted:
    the middle value, or the mean of the middle two as numpy takes it (their sum, then halved, in
    the array's dtype)."""
    n = sorted_values.shape[0]
    if n % 2:
        return sorted_values[n // 2]
    s = sorted_values[n // 2 - 1] + sorted_values[n // 2]
    return s / 2


Factor = tuple[np.ndarray, tuple[int, int]]


def flat_factors(kernel: np.ndarray) -> tuple[Factor, ...]:
    """Flat structuring elements (uint8 kernel, OpenCV anchor (x, y)) whose successive erosions (or
    dilations) are the erosion (dilation) by ``kernel`` anchored at its centre.

    A line of n pixels is the union of translates of its own first m pixels:
    ``kernel = S (+) T`` (Minkowski sum) with ``S`` those m pixels and ``T``
    the fewest translations that cover the line with copies of ``S`` lying on
    it (an interval cover along the line, taken greedily, which is optimal
    there); m is the one with the fewest pixels in ``S`` and ``T``
    together. An erosion by ``S (+) T`` is the erosion by ``S`` and then by
    ``T``, the minimum over the same pixels: the same values, with some
    m + n/m instead of n comparisons per pixel. A kernel that is one row or
    one column (OpenCV's separable case) or that nothing shortens stays whole.
    """
    h, w = kernel.shape
    centre = np.array([(h - 1) // 2, (w - 1) // 2])
    pts = np.argwhere(kernel) - centre
    if len(pts) == 0:
        return ((kernel, (int(centre[1]), int(centre[0]))),)
    whole = (_as_kernel(pts),)
    if len(pts) < 4:
        return whole
    major = 1 if np.ptp(pts[:, 1]) >= np.ptp(pts[:, 0]) else 0
    pts = pts[np.lexsort((pts[:, 1 - major], pts[:, major]))]
    members = {tuple(p) for p in pts.tolist()}
    n = len(pts)
    best: tuple[int, np.ndarray, np.ndarray] | None = None
    for m in range(2, n // 2 + 1):
        s = pts[:m] - pts[0]
        valid = [all((y + dy, x + dx) in members for dy, dx in s.tolist()) for y, x in pts.tolist()]
        # each valid start i covers points i .. i+m-1 (one point per step along the major axis)
        chosen, pos = [], 0
        while pos < n:
            i = next((j for j in range(min(pos, n - m), max(-1, pos - m), -1) if valid[j]), None)
            if i is None:
                break
            chosen.append(i)
            pos = i + m
        if pos < n:
            continue
        t = pts[chosen]
        if best is None or m + len(t) < best[0]:
            best = (m + len(t), s, t)
    if best is None or best[0] >= n:
        return whole
    return _as_kernel(best[1]), _as_kernel(best[2])


def _as_kernel(offsets: np.ndarray) -> Factor:
    """A uint8 kernel with ones at ``offsets`` (dy, dx) from its anchor, the anchor inside its box."""
    lo = np.minimum(offsets.min(0), 0)
    hi = np.maximum(offsets.max(0), 0)
    k = np.zeros(tuple(hi - lo + 1), np.uint8)
    k[tuple((offsets - lo).T)] = 1
    return k, (int(-lo[1]), int(-lo[0]))


def max_opening(signal: np.ndarray, plans: tuple[tuple[Factor, ...], ...], radius_px: int) -> np.ndarray:
    """The largest grey opening of ``signal`` over several flat kernels, each given as its
    :func:`flat_factors`; the frame's edge mirrored (OpenCV's ``BORDER_REFLECT``) for the erosion and
    again for the dilation, as ``cv2.dilate(cv2.erode(signal, k, borderType=BORDER_REFLECT), k,
    borderType=BORDER_REFLECT)`` does. ``radius_px``: no kernel reaches further from its anchor.
    """
    import cv2

    r = radius_px
    h, w = signal.shape
    lines = np.zeros_like(signal)
    padded = cv2.copyMakeBorder(signal, r, r, r, r, cv2.BORDER_REFLECT)
    for factors in plans:
        e = padded
        for k, anchor in factors:
            e = cv2.erode(e, k, anchor=anchor, borderType=cv2.BORDER_REFLECT)
        d = cv2.copyMakeBorder(e[r : r + h, r : r + w], r, r, r, r, cv2.BORDER_REFLECT)
        for k, anchor in factors:
            d = cv2.dilate(d, k, anchor=anchor, borderType=cv2.BORDER_REFLECT)
        np.maximum(lines, d[r : r + h, r : r + w], out=lines)
    return lines


def median(values: np.ndarray) -> Any:
    """``np.median(values)`` (the same numpy scalar) of a finite array, sooner on a large one.

    A strided sample brackets the middle rank; one pass counts what lies
    below the bracket and keeps what lies in it, and only that is
    partitioned. The middle one or two values found are handed to
    ``np.median`` itself (which averages two as it always does), so the
    result is the same to the bit; a bracket that missed (it cannot on the
    data here, but a sample is a sample) falls back to ``np.median``.
    """
    x = np.ravel(values)
    n = x.size
    if n < 65536:
        return np.median(x)
    k_lo, k_hi = (n - 1) // 2, n // 2
    sample = np.sort(x[:: n // 16384])
    ns = sample.size
    margin = int(5 * np.sqrt(ns)) + 2
    lo, hi = sample[max(0, ns // 2 - margin)], sample[min(ns - 1, ns // 2 + margin)]
    below = int(np.count_nonzero(x < lo))
    inside = x[(x >= lo) & (x <= hi)]
    if not below <= k_lo or not k_hi < below + inside.size:
        return np.median(x)
    ks = sorted({k_lo - below, k_hi - below})
    mid = np.partition(inside, ks)[[k_lo - below, k_hi - below]]
    return np.median(mid)


def percentile_sorted(sorted_values: np.ndarray, q: float) -> Any:
    """``np.percentile(values, q)`` (the default linear method, ``q`` a Python number) of the
    non-empty, finite ``values`` given sorted: the same numpy scalar, without numpy's
    general machinery (a hundred times the arithmetic for one small array).

    numpy's own steps: the virtual index ``(n - 1) q / 100`` in float64, its
    fraction as a weak Python float, and the interpolation in the array's
    dtype from the nearer end (``a + d t`` below one half, ``b - d (1 - t)``
    from it).
    """
    s = sorted_values
    n = s.shape[0]
    virtual = (n - 1) * np.true_divide(q, 100)
    if virtual >= n - 1:
        return s[-1]
    below = np.floor(virtual)
    i = int(below)
    t = float(virtual - below)
    a, b = s[i], s[i + 1]
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t
