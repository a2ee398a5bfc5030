"""Blob mode of the classical segmenter: round, similar-sized cells in a counting chamber.

Brightfield counting-chamber frames (haemocytometer, live/dead counts) hold
sparse, round cells of one expected size on a flat field crossed by the
chamber's ruling. The contrast-mode watershed shatters the ruling into
"cells" and merges or drops the faint ones; here each cell is one detected
blob. On a grid no finer than ``work_pixel_size_um``:

1. Normalise (0.5/99.5 percentiles) and flatten (Gaussian background,
   ``background_um``); an empty field is 0 cells (as in the other modes).
2. Local contrast: the standard deviation over ``contrast_um`` (high on the
   dark ring and bright core of a living cell and on the grey body of a dead
   one, whatever the polarity).
3. The chamber's ruling goes: the grey opening of the contrast by a line of
   ``line_um`` at ``line_angles`` orientations keeps only structures longer
   than that line (grid lines; a cell is shorter) and is subtracted.
4. In units of the field's own contrast spread (median, MAD: the score is
   per-frame normalised), smoothed at a quarter of ``cell_diameter_um``,
   every local maximum at least ``seed_distance_um`` from a higher one and
   above ``blob_snr`` is a candidate cell.
5. Each candidate's region: a marker watershed of the smoothed score within
   ``fg_snr`` and within 0.7 x ``cell_diameter_um`` of its seed, cut at
   ``fg_fraction`` of its own peak, holes filled, largest piece kept.
6. A region is a cell when it is at least ``min_area_um2``, solid
   (``min_solidity``), round unless cut by the frame edge
   (``max_axis_ratio``), has a dark part (its darkest flattened value below
   ``-min_dark``: in-focus cells, living or dead, have one; out-of-focus ghosts
   and smudges do not), that dark part is a body and not a speck (a tenth
   of the region is below ``-min_dark_body``: a ring or a core, not a few
   dark pixels on a ghost or on debris) and, when cut by the frame edge, its centroid lies at
   least ``border_um`` inside it (a sliver of a cell outside the field is not counted).

The defaults of these options were tuned on training frames of the live/dead
counting-chamber set at 0.7 um/px (``config/livedead.toml``,
``bench/results/e2e_livedead.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np


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


@lru_cache(maxsize=8)
def line_plans(length_px: int, n_angles: int) -> tuple[tuple[Any, ...], ...]:
    """:func:`line_kernels`, each as the short factors of :func:`~.morph.flat_factors`."""
    from cellmonitor_plugins.segmenters.morph import flat_factors

    return tuple(flat_factors(k) for k in line_kernels(length_px, n_angles))


def remove_lines(signal: np.ndarray, length_px: int, n_angles: int) -> np.ndarray:
    """``signal`` minus its largest grey opening by a line of ``length_px`` over ``n_angles`` orientations.

    An opening keeps only what a whole line fits into, so grid lines longer
    than ``length_px`` are removed and blobs shorter than it are kept whole.
    The frame's edge is mirrored (OpenCV's ``BORDER_REFLECT``); each line is
    applied as its short factors (:func:`~.morph.max_opening`: the same values,
    about a third of the work).
    """
    from cellmonitor_plugins.segmenters.morph import max_opening

    kernels = line_kernels(length_px, n_angles)
    return signal - max_opening(signal, line_plans(length_px, n_angles), kernels[0].shape[0] // 2)


def _touches_edge(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, ...]) -> bool:
    return bool(rows.min() == 0 or cols.min() == 0 or rows.max() == shape[0] - 1 or cols.max() == shape[1] - 1)


FEATURES: tuple[str, ...] = (
    "log_peak", "log_area_um2", "dark_min", "dark_p10", "median", "bright_p90", "bright_max", "spread",
    "solidity", "axis_ratio", "edge_um", "touches_edge", "log_score_mean", "ring", "log_seeds",
)
"""What is measured on every candidate region (the learned acceptance rule's inputs), in this order:
the seed's smoothed contrast peak (log), area (log um^2), darkest / 10th percentile / median /
90th percentile / brightest flattened value, their spread (std), solidity, longest / shortest
axis, the centroid's distance to the frame edge (um, capped at :data:`EDGE_CAP_UM`), whether
it touches the edge, its mean contrast score (log), its rim's mean minus its mean (a dark ring
is negative), the number of seeds in the field (log: crowded or sparse)."""

#: distances to the frame edge beyond this are all "inside" (one cell and a half)
EDGE_CAP_UM = 20.0
#: width of the rim whose mean is compared with the whole region's (``ring``)
RING_UM = 1.4


@dataclass(frozen=True)
class Candidate:
    """One candidate cell on the working grid: its region (a mask within ``box``) and its measurements."""

    box: tuple[slice, slice]
    mask: np.ndarray
    features: np.ndarray  # float64, :data:`FEATURES` order
    edge_um: float  # the centroid's distance to the frame edge (not capped: the hand-set rule's border_um)


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)  # scipy's default erosion structure


def region_features(mask: np.ndarray, flat: np.ndarray, score: np.ndarray, offset: tuple[int, int], shape: tuple[int, ...],
                    work_um: float, peak: float, n_seeds: int) -> tuple[np.ndarray, float]:
    """The :data:`FEATURES` of one region (a boolean mask within its bounding slice of ``flat`` / ``score``),
    and its centroid's distance to the frame edge in um (uncapped)."""
    import cv2
    from cellmonitor_plugins.segmenters.morph import (
        axis_ratio,
        convex_area,
        median_sorted,
        percentile_sorted,
    )

    values = flat[mask]
    ordered = np.sort(values)
    rows, cols = np.nonzero(mask)
    ratio = axis_ratio(rows, cols)
    solidity = len(values) / convex_area(mask)
    rows, cols = rows + offset[0], cols + offset[1]
    cy, cx = rows.mean(), cols.mean()
    # scipy's binary_erosion(mask, iterations=r): r erosions by the 4-neighbour cross, outside the box empty
    inner = cv2.erode(mask.astype(np.uint8), _CROSS, iterations=max(1, round(RING_UM / work_um)),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    rim = mask & ~inner
    ring = float(flat[rim].mean() - values.mean()) if inner.any() and rim.any() else 0.0
    edge = float(min(cy, cx, shape[0] - 1 - cy, shape[1] - 1 - cx)) * work_um
    return np.array([
        np.log(max(peak, 1e-3)),
        np.log(len(values) * work_um**2),
        float(ordered[0]),
        float(percentile_sorted(ordered, 10)),
        float(median_sorted(ordered)),
        float(percentile_sorted(ordered, 90)),
        float(ordered[-1]),
        float(values.std()),
        float(solidity),
        ratio,
        min(edge, EDGE_CAP_UM),
        float(_touches_edge(rows, cols, shape)),
        np.log(max(float(score[mask].mean()), 1e-3)),
        ring,
        np.log(max(n_seeds, 1)),
    ]), edge


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
    from cellmonitor_plugins.segmenters.morph import (
        fill_holes,
        median,
        peak_local_max,
        watershed,
        within_distance,
    )
    from scipy import ndimage as ndi

    s = o.contrast_um / work_um
    mean = cv2.GaussianBlur(flat, (0, 0), s)
    contrast = np.sqrt(np.clip(cv2.GaussianBlur(flat * flat, (0, 0), s) - mean * mean, 0, None)).astype(np.float32, copy=False)
    if o.line_um > 0:
        contrast = remove_lines(contrast, int(round(o.line_um / work_um)), o.line_angles)
    med = float(median(contrast))
    mad = max(1.4826 * float(median(np.abs(contrast - med))), 1e-6)
    score = (contrast - med) / mad
    smooth = cv2.GaussianBlur(score, (0, 0), o.cell_diameter_um / 4 / work_um)
    peaks = peak_local_max(smooth, max(1, int(o.seed_distance_um / work_um)), snr)
    if len(peaks) == 0:
        return []
    markers = np.zeros(flat.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    near = within_distance(peaks, flat.shape, 0.7 * o.cell_diameter_um / work_um)
    regions = watershed(-smooth, markers, ((score > o.fg_snr) & near) | (markers > 0))
    out = []
    for i, sl in enumerate(ndi.find_objects(regions)):
        if sl is None:
            continue
        own = regions[sl] == i + 1
        sc = score[sl]
        cut = fill_holes(own & (sc > max(o.fg_snr, o.fg_fraction * float(sc[own].max()))))
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
