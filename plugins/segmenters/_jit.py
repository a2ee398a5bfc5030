"""The numba kernels of :mod:`.morph` (imported when a segmenter first needs one; compiled once, cached on disk).

The compiled code is cached beside this file, else in ``$NUMBA_CACHE_DIR`` (the systemd unit
sets ``/var/cache/cellmonitor/numba``: its file system is read-only elsewhere), else in the
user's cache; where none of them is writable numba refuses ``cache=True`` at import, so the
kernels are then compiled at every start instead (a few seconds, in the warm-up frame).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba as nb
import numpy as np


def _njit(fn: Callable[..., Any]) -> Any:
    # nogil: a kernel lets the other threads run (the encoders and classify beside the
    # segment-ahead thread); each works on its own arrays only
    try:
        return nb.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": no writable cache folder
        return nb.njit(nogil=True)(fn)

# 8-neighbours before a pixel in raster order (dy, dx), and after it
_UP = ((-1, -1), (-1, 0), (-1, 1), (0, -1))
_DOWN = ((1, 1), (1, 0), (1, -1), (0, 1))


@_njit
def reconstruct_dilation(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Grey reconstruction by dilation of ``seed`` under ``mask`` (8-connected), Vincent's hybrid algorithm.

    A raster and an anti-raster pass propagate most of the values; the
    pixels whose lower neighbours can still rise go to a FIFO queue that
    finishes the job. ``seed <= mask`` everywhere (as for ``h_maxima``).
    """
    h, w = seed.shape
    out = np.minimum(seed, mask)
    for y in range(h):
        for x in range(w):
            v = out[y, x]
            for dy, dx in _UP:
                yy, xx = y + dy, x + dx
                if 0 <= yy and 0 <= xx < w and out[yy, xx] > v:
                    v = out[yy, xx]
            out[y, x] = min(v, mask[y, x])
    n = h * w
    queue = np.empty(n, np.int64)
    queued = np.zeros(n, np.bool_)
    head = 0
    size = 0
    for y in range(h - 1, -1, -1):
        for x in range(w - 1, -1, -1):
            v = out[y, x]
            for dy, dx in _DOWN:
                yy, xx = y + dy, x + dx
                if yy < h and 0 <= xx < w and out[yy, xx] > v:
                    v = out[yy, xx]
            v = min(v, mask[y, x])
            out[y, x] = v
            for dy, dx in _DOWN:
                yy, xx = y + dy, x + dx
                if yy < h and 0 <= xx < w and out[yy, xx] < v and out[yy, xx] < mask[yy, xx]:
                    p = y * w + x
                    if not queued[p]:
                        queued[p] = True
                        queue[(head + size) % n] = p
                        size += 1
                    break
    while size > 0:
        p = queue[head]
        head = (head + 1) % n
        size -= 1
        queued[p] = False
        y, x = p // w, p % w
        v = out[y, x]
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                yy, xx = y + dy, x + dx
                if (dy or dx) and 0 <= yy < h and 0 <= xx < w:
                    if out[yy, xx] < v and out[yy, xx] != mask[yy, xx]:
                        out[yy, xx] = min(v, mask[yy, xx])
                        q = yy * w + xx
                        if not queued[q]:
                            queued[q] = True
                            queue[(head + size) % n] = q
                            size += 1
    return out


@_njit
def greedy_spacing(coord: np.ndarray, spacing: float) -> np.ndarray:  # pragma: no cover - compiled
    """Indices of the points of ``coord`` (n, 2), in order, kept when none kept before lies closer
    than ``spacing`` (Chebyshev): scikit-image's ``ensure_spacing`` with ``p_norm=inf``."""
    n = coord.shape[0]
    keep = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        ok = True
        for j in range(k):
            q = keep[j]
            if max(abs(coord[i, 0] - coord[q, 0]), abs(coord[i, 1] - coord[q, 1])) < spacing:
                ok = False
                break
        if ok:
            keep[k] = i
            k += 1
    return keep[:k]


@_njit
def _smaller(vals: np.ndarray, ages: np.ndarray, a: int, b: int) -> bool:  # pragma: no cover - compiled
    if vals[a] != vals[b]:
        return vals[a] < vals[b]
    return ages[a] < ages[b]


@_njit
def _swap(vals: np.ndarray, ages: np.ndarray, idxs: np.ndarray, a: int, b: int) -> None:  # pragma: no cover - compiled
    vals[a], vals[b] = vals[b], vals[a]
    ages[a], ages[b] = ages[b], ages[a]
    idxs[a], idxs[b] = idxs[b], idxs[a]


@_njit
def _push(vals: np.ndarray, ages: np.ndarray, idxs: np.ndarray, items: int, v: float, age: int, p: int) -> int:  # pragma: no cover - compiled
    """Push (value, age, pixel) on the binary heap of ``items`` entries, sift it up; the new size."""
    child = items
    vals[child] = v
    ages[child] = age
    idxs[child] = p
    while child > 0:
        parent = (child + 1) // 2 - 1
        if _smaller(vals, ages, child, parent):
            _swap(vals, ages, idxs, parent, child)
            child = parent
        else:
            break
    return items + 1


@_njit
def watershed_4(image: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:  # pragma: no cover - compiled
    """Marker watershed, 4-connected, in place on ``labels`` (the markers, 0 elsewhere), within ``mask``.

    scikit-image's algorithm step for step (``watershed_raveled`` without
    compactness or watershed lines): a binary heap ordered by (value, age),
    the markers pushed first in raster order, a pixel labelled when pushed,
    its neighbours visited up, left, right, down, a neighbour's priority at
    least its parent's.
    """
    h, w = image.shape
    n = h * w
    cap = max(16, n)
    vals = np.empty(cap, np.float64)
    ages = np.empty(cap, np.int64)
    idxs = np.empty(cap, np.int64)
    items = 0
    for p in range(n):
        if labels.flat[p] != 0:
            # push (marker: age 0)
            items = _push(vals, ages, idxs, items, np.float64(image.flat[p]), 0, p)
    age = 1
    while items > 0:
        ev, ei = vals[0], idxs[0]
        items -= 1
        if items > 0:
            _swap(vals, ages, idxs, 0, items)
            i = 0
            while True:
                left, right = 2 * i + 1, 2 * i + 2
                smallest = i
                if left < items:
                    if _smaller(vals, ages, left, i):
                        smallest = left
                    if right < items and _smaller(vals, ages, right, smallest):
                        smallest = right
                else:
                    break
                if smallest == i:
                    break
                _swap(vals, ages, idxs, i, smallest)
                i = smallest
        y, x = ei // w, ei % w
        lab = labels.flat[ei]
        for k in range(4):
            if k == 0:
                if y == 0:
                    continue
                q = ei - w
            elif k == 1:
                if x == 0:
                    continue
                q = ei - 1
            elif k == 2:
                if x == w - 1:
                    continue
                q = ei + 1
            else:
                if y == h - 1:
                    continue
                q = ei + w
            if not mask.flat[q] or labels.flat[q] != 0:
                continue
            age += 1
            v = np.float64(image.flat[q])
            labels.flat[q] = lab
            if v < ev:
                v = ev
            if items == cap:  # cannot happen: a pixel is pushed at most once
                raise RuntimeError("watershed heap overflow")
            items = _push(vals, ages, idxs, items, v, age, q)
