"""Shared segmentation post-processing: label image -> filtered, relabelled Cells.

Every segmenter (classical, SAM, a lab's own) ends here, so the size and
border policy is the same whichever produced the masks.
"""

from __future__ import annotations

import logging

import numpy as np

from monitor.records import Cell, Cells

log = logging.getLogger(__name__)


def cells_from_labels(
    labels: np.ndarray,
    pixel_size_um: float,
    min_area_um2: float = 0.0,
    max_area_um2: float = float("inf"),
    exclude_border: bool = False,
) -> Cells:
    """Filter instances by area in um^2 and border contact, relabel 1..N, measure each cell.

    Parameters
    ----------
    labels
        Instance label image (any integer type, 0 = background) on the
        frame's pixel grid.
    pixel_size_um
        Size of one pixel of ``labels``, in um.
    min_area_um2, max_area_um2
        Instances whose area (pixels x ``pixel_size_um**2``) lies outside
        ``[min_area_um2, max_area_um2]`` are dropped. Areas are compared in
        um^2, not pixels, so the same limits select the same cells at any
        pixel size.
    exclude_border
        Drop instances with any pixel on the image's edge (their area and
        shape are unknown).

    Returns
    -------
    Cells
        An int32 label image with the kept instances renumbered 1..N in the
        order of their original ids, and one :class:`~monitor.records.Cell`
        per instance: id, centroid (y, x) in pixels, area in um^2 and
        bounding box ``(y0, x0, y1, x1)`` with exclusive ends.
    """
    from skimage.measure import regionprops

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (got shape {labels.shape})")
    out = np.zeros(labels.shape, dtype=np.int32)
    cells: list[Cell] = []
    px_area = pixel_size_um**2
    h, w = labels.shape
    dropped = 0
    for rp in regionprops(labels.astype(np.int32, copy=False)):
        area = rp.area * px_area
        y0, x0, y1, x1 = rp.bbox
        if area < min_area_um2 or area > max_area_um2 or (
            exclude_border and (y0 == 0 or x0 == 0 or y1 == h or x1 == w)
        ):
            dropped += 1
            continue
        new_id = len(cells) + 1
        out[rp.slice][rp.image] = new_id
        cy, cx = rp.centroid
        cells.append(Cell(new_id, (float(cy), float(cx)), float(area), (int(y0), int(x0), int(y1), int(x1))))
    if dropped:
        log.debug("cells_from_labels: kept %d, dropped %d by area/border", len(cells), dropped)
    return Cells(out, tuple(cells), pixel_size_um)
