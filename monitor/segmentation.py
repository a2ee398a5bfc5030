"""Shared segmentation post-processing: label image -> filtered, relabelled Cells."""

from __future__ import annotations

import numpy as np

from monitor.records import Cell, Cells


def cells_from_labels(
    labels: np.ndarray,
    pixel_size_um: float,
    min_area_um2: float = 0.0,
    max_area_um2: float = float("inf"),
    exclude_border: bool = False,
) -> Cells:
    """Filter instances by area in um^2 (and border contact), relabel 1..N, measure.

    Areas are compared in um^2, not pixels, so the same limits select the
    same cells at any pixel size.
    """
    from skimage.measure import regionprops

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int32)
    cells = []
    px_area = pixel_size_um**2
    h, w = labels.shape
    for rp in regionprops(labels.astype(np.int32, copy=False)):
        area = rp.area * px_area
        if area < min_area_um2 or area > max_area_um2:
            continue
        y0, x0, y1, x1 = rp.bbox
        if exclude_border and (y0 == 0 or x0 == 0 or y1 == h or x1 == w):
            continue
        new_id = len(cells) + 1
        out[rp.slice][rp.image] = new_id
        cy, cx = rp.centroid
        cells.append(Cell(new_id, (float(cy), float(cx)), float(area), (int(y0), int(x0), int(y1), int(x1))))
    return Cells(out, tuple(cells), pixel_size_um)
