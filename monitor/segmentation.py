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
    relabel: bool = True,
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
    relabel
        False: keep each instance's own id (masks made by another tool, whose
        ids a per-cell table must name).

    Returns
    -------
    Cells
        An int32 label image with the kept instances renumbered 1..N in the
        order of their original ids, and one :class:`~monitor.records.Cell`
        per instance: id, centroid (y, x) in pixels, area in um^2 and
        bounding box ``(y0, x0, y1, x1)`` with exclusive ends.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (got shape {labels.shape})")
    lab = labels.astype(np.int32, copy=False)
    out = np.zeros(labels.shape, dtype=np.int32)
    cells: list[Cell] = []
    px_area = pixel_size_um**2
    h, w = labels.shape
    dropped = 0
    # each instance measured within its bounding box (what regionprops does, without its per-region objects)
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        own = lab[sl] == i + 1
        ys, xs = np.nonzero(own)
        area = ys.size * px_area
        y0, x0, y1, x1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        if area < min_area_um2 or area > max_area_um2 or (
            exclude_border and (y0 == 0 or x0 == 0 or y1 == h or x1 == w)
        ):
            dropped += 1
            continue
        new_id = len(cells) + 1 if relabel else i + 1
        out[sl][own] = new_id
        # the mean of the pixels' float coordinates, as regionprops' centroid takes it
        cy, cx = float(np.mean((ys + y0).astype(np.float64))), float(np.mean((xs + x0).astype(np.float64)))
        cells.append(Cell(new_id, (cy, cx), float(area), (int(y0), int(x0), int(y1), int(x1))))
    if dropped:
        log.debug("cells_from_labels: kept %d, dropped %d by area/border", len(cells), dropped)
    return Cells(out, tuple(cells), pixel_size_um)


def match_boxes(centroids_yx: np.ndarray, boxes_xyxy: np.ndarray, grow: float = 0.25) -> list[tuple[int, int]]:
    """One-to-one (cell, box) pairs of segmented cells and annotated boxes.

    A cell may match a box when its centroid (y, x) lies inside the box
    ``(x0, y0, x1, y1)`` (Pascal VOC order) grown by ``grow`` of its size on
    each side; among those, the assignment minimising the summed squared
    centre distance (in half-box units) is taken (Hungarian). What the
    end-to-end benchmark scores and what ``segment-fit`` learns from.
    """
    from scipy.optimize import linear_sum_assignment

    if len(centroids_yx) == 0 or len(boxes_xyxy) == 0:
        return []
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    hw = np.maximum((b[:, 2] - b[:, 0]) / 2, 0.5) * (1 + 2 * grow)
    hh = np.maximum((b[:, 3] - b[:, 1]) / 2, 0.5) * (1 + 2 * grow)
    dx = np.abs(centroids_yx[:, 1][:, None] - cx[None]) / hw[None]
    dy = np.abs(centroids_yx[:, 0][:, None] - cy[None]) / hh[None]
    ok = (dx <= 1) & (dy <= 1)
    rows, cols = linear_sum_assignment(np.where(ok, dx * dx + dy * dy, 1e6))
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if ok[i, j]]
