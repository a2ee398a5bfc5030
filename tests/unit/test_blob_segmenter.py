"""The classical segmenter's ``blobs`` mode (counting-chamber frames) on synthetic brightfield fields."""

from __future__ import annotations

import numpy as np
import pytest
from cellmonitor_plugins.segmenters.blobs import remove_lines
from cellmonitor_plugins.segmenters.classical import Options, resolve_mode, segment_image

UM = 0.7  # um/px, the livedead frames' scale
SHAPE = (220, 220)


def _field(seed: int = 0) -> np.ndarray:
    return 0.5 + np.random.default_rng(seed).normal(0, 0.01, SHAPE).astype(np.float32)


def _cell(img: np.ndarray, cy: float, cx: float, r: float = 10.0, dead: bool = False, scale: float = 1.0) -> None:
    """A living cell (black ring, bright core) or a dead one (a grey body, darker centre), ``scale`` x the usual contrast."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    d = np.hypot(yy - cy, xx - cx)
    if dead:
        img[d <= r] -= 0.2 * scale
        img[d <= 0.5 * r] -= 0.25 * scale
    else:
        img[(d <= r) & (d > 0.65 * r)] -= 0.45 * scale
        img[d <= 0.45 * r] += 0.3 * scale


def _ruling(img: np.ndarray, row: int) -> None:
    """A chamber grid line across the whole field: a dark band beside a bright one."""
    img[row : row + 3] -= 0.4
    img[row + 3 : row + 5] += 0.3


def _blobs(**kw: object) -> Options:
    return Options(mode="blobs", work_pixel_size_um=UM, background_um=10.0, contrast_um=1.5, **kw)


def _centroids(labels: np.ndarray) -> list[tuple[float, float]]:
    out = []
    for i in range(1, int(labels.max()) + 1):
        ys, xs = np.nonzero(labels == i)
        if len(ys):
            out.append((float(ys.mean()), float(xs.mean())))
    return out


CENTRES = [(40.0, 40.0), (45.0, 150.0), (110.0, 95.0), (180.0, 60.0), (175.0, 170.0)]


def test_counts_living_and_dead_cells_once_each_and_not_the_ruling():
    img = _field()
    for i, (cy, cx) in enumerate(CENTRES):
        _cell(img, cy, cx, dead=i % 2 == 1)
    _ruling(img, 140)
    found = _centroids(segment_image(img, UM, _blobs()))
    assert len(found) == len(CENTRES)
    for cy, cx in CENTRES:
        assert min(np.hypot(cy - y, cx - x) for y, x in found) < 3.0


def test_the_ruling_is_what_line_removal_takes_away():
    img = _field()
    _cell(img, 60.0, 60.0)
    _ruling(img, 140)
    with_lines = len(_centroids(segment_image(img, UM, _blobs(line_um=0.0))))
    assert with_lines > 1  # the grid line alone turns into "cells" ...
    assert len(_centroids(segment_image(img, UM, _blobs()))) == 1  # ... unless it is removed


def test_remove_lines_keeps_a_blob_and_drops_a_long_line():
    sig = np.zeros((101, 101), np.float32)
    sig[50, :] = 1.0
    sig[20:30, 20:30] = 1.0
    out = remove_lines(sig, 41, 12)
    assert float(np.abs(out[50, :]).max()) < 1e-6
    assert float(out[20:30, 20:30].min()) == pytest.approx(1.0)


def _ghost(img: np.ndarray) -> None:
    """A defocused cell at (175, 170): a faint ring round a bright core, no dark part."""
    d = np.hypot(*(np.mgrid[: SHAPE[0], : SHAPE[1]] - np.array([175.0, 170.0])[:, None, None]))
    img[(d <= 10) & (d > 6.5)] -= 0.1
    img[d <= 4.5] += 0.2


def test_an_out_of_focus_ghost_is_not_a_cell():
    img = _field()
    for cy, cx in CENTRES[:3]:
        _cell(img, cy, cx)
    # a defocused cell: a faint ring round a bright core, no dark part (the in-focus ones are black-ringed)
    _ghost(img)
    assert len(_centroids(segment_image(img, UM, _blobs(min_dark=0.0, min_dark_body=0.0)))) == 4  # a blob like the others ...
    found = _centroids(segment_image(img, UM, _blobs()))
    assert len(found) == 3  # ... but without a dark part it is not counted
    assert all(np.hypot(y - 175.0, x - 170.0) > 20 for y, x in found)


def test_a_dark_speck_on_a_ghost_is_not_a_dark_part():
    img = _field()
    for cy, cx in CENTRES[:3]:
        _cell(img, cy, cx)
    # a defocused cell as above, with a speck of debris (2 x 2 px, as dark as a living cell's ring) on it
    _ghost(img)
    img[168:170, 176:178] -= 0.45
    assert len(_centroids(segment_image(img, UM, _blobs(min_dark_body=0.0)))) == 4  # the speck passes min_dark ...
    found = _centroids(segment_image(img, UM, _blobs()))
    assert len(found) == 3  # ... but a tenth of a cell is darker than that: the ghost is not counted
    assert all(np.hypot(y - 175.0, x - 170.0) > 20 for y, x in found)
    for cy, cx in CENTRES[:3]:  # the in-focus cells (a dark ring: a body, not a speck) are all kept
        assert min(np.hypot(cy - y, cx - x) for y, x in found) < 3.0


def test_a_cell_cut_by_the_edge_counts_only_when_its_centre_is_inside():
    img = _field()
    _cell(img, 80.0, 60.0)
    _cell(img, 110.0, 6.0)  # cut, but its centre 4.2 um inside: counted
    _cell(img, 170.0, -6.0)  # a sliver of a cell outside the field: not counted
    assert len(_centroids(segment_image(img, UM, _blobs(border_um=0.0)))) == 3  # the sliver is a candidate ...
    found = _centroids(segment_image(img, UM, _blobs()))  # ... that the border rule drops
    assert len(found) == 2
    assert min(abs(y - 110.0) for y, _ in found) < 4.0


def test_a_noise_only_field_is_empty():
    assert segment_image(_field(3), UM, _blobs()).max() == 0


def test_auto_never_picks_blobs():
    assert {resolve_mode("auto", v) for v in (0.0, 0.1, 0.5, 0.9)} == {"intensity", "contrast"}
    assert resolve_mode("blobs", 0.5) == "blobs"
